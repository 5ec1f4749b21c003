"""MEND — Model Editor Networks using Gradient Decomposition (Mitchell et al., ICLR 2022; `eric-mitchell/mend`,
EasyEdit's MEND), and MEND+SADR: the same editor with SADR's term in its training loss (the SADR paper's Table 7).

For every edited weight W_ℓ (d_out × d_in: the MLP input and output projections of the last blocks), the gradient of
the edit's NLL is a sum of rank-1 terms, one per token t:

    ∇W_ℓ = Σ_t δ_t u_tᵀ          u_t: the layer's input at t;  δ_t: the loss's gradient at the layer's output at t

A trained hyper-network g_s (one per weight shape s, shared by the layers of that shape, each layer a "mode" m) maps
the normalised pair to a pseudo-pair, and the edit adds their outer products with a learned step η_ℓ:

    (ũ_t, δ̃_t) = g_s( norm(u_t) ⊕ norm(δ_t) ; m )          W_ℓ ← W_ℓ + η_ℓ Σ_t δ̃_t ũ_tᵀ

- norm: running mean and standard deviation of u and δ per shape (updated while training only, then frozen).
- g_s is MEND's IDMLP: n_hidden + 1 residual low-rank layers  x ← clamp(s_m ⊙ (U V x + b) + t_m, min=0) + x  with
  U = 0 at initialisation (g is the identity), V ~ N(0, 1), rank min(rank, d_u + d_δ); clamp, not ReLU, so the
  gradient passes at 0 (as the original).
- The update is *added* (as the original and EasyEdit; the paper writes W − α∇̃): training learns the sign.
- Rows where u or δ is exactly zero are dropped (as the original).
- The hyper-network runs in fp32; ΔW is added in the model's dtype (in bf16, entries near 1e-3 on weights near 0.02
  lose about a tenth to rounding; the originals ran fp32 models).

Training (`editors/mend_train.py`, `driftbench train-mend`) makes the checkpoint this editor loads: a content-named
safetensors artefact per (model, recipe, SADR or not). At edit time there is one forward/backward on the edit prompt
and one update; MEND+SADR differs only by its checkpoint. Its cells have no optimisation steps, so no ``+steps``.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from basis.io import dumps_line, sha256_text
from editors.base import Artefact, EditHandle, Editor, HparamsError
from editors.core import Hparams, _is_int, build_batch, make_request, only_grad
from model_layer.arch import arch_for

MODULE_ROLES = ("mlp_in", "mlp_out", "attn_out")


@dataclass
class MendHparams(Hparams):
    layers: tuple = ()
    modules: tuple = ("mlp_in", "mlp_out")  # roles of model_layer.arch (GPT-J: fc_in, fc_out)
    rank: int = 1920
    n_hidden: int = 1
    edit_lr: float = 1e-4  # η_ℓ at initialisation (learned)
    # the training recipe (the checkpoint's key; editors/mend_train.py)
    train_steps: int = 1000  # edits seen (each with its locality example)
    lr: float = 1e-6
    cedit: float = 0.1
    cloc: float = 1.0
    accumulate: int = 10  # edits per optimiser step
    grad_clip: float = 100.0
    train_seed: int = 0
    heldout: int = 64  # the first cases of the sweeps' held-out order, never trained on
    heldout_seed: int = 7  # that order's seed (the sweep's default)
    train_cases: str = ""  # sha256[:16] of the training cases' ids, in order (set by the CLI from the dataset)
    checkpoint_every: int = 10  # optimiser steps between resumable snapshots
    sadr_gamma: float = 1e-2
    sadr_hinge: bool = True
    checkpoint_dir: str = "checkpoints"
    model_id: str = ""

    editor: ClassVar[str] = "MEND"
    required: ClassVar[dict[str, str]] = {"layers": "the blocks whose weights MEND edits (the original: the last 3)"}

    @classmethod
    def normalise(cls, kw: dict[str, Any]) -> dict[str, Any]:
        layers = kw.get("layers", ())
        if not layers or not all(_is_int(x) and x >= 0 for x in layers) or len(set(layers)) != len(layers):
            raise HparamsError(f"MEND hparams 'layers' must be a non-empty list of distinct layer indices, got {layers!r}")
        mods = kw.get("modules", cls.modules)
        if not mods or not set(mods) <= set(MODULE_ROLES) or len(set(mods)) != len(mods):
            raise HparamsError(f"MEND hparams 'modules' must be distinct roles among {list(MODULE_ROLES)}, got {mods!r}")
        for name, low in (("rank", 1), ("n_hidden", 0), ("train_steps", 1), ("accumulate", 1),
                          ("checkpoint_every", 1), ("heldout", 0)):
            if name in kw and not kw[name] >= low:
                raise HparamsError(f"MEND hparams {name!r} must be >= {low}, got {kw[name]!r}")
        for name in ("edit_lr", "grad_clip"):
            if name in kw and not kw[name] > 0:
                raise HparamsError(f"MEND hparams {name!r} must be > 0, got {kw[name]!r}")
        for name in ("cedit", "cloc"):
            if name in kw and not kw[name] >= 0:
                raise HparamsError(f"MEND hparams {name!r} must be >= 0, got {kw[name]!r}")
        return dict(kw, layers=tuple(layers), modules=tuple(mods))

    def recipe(self, sadr: dict[str, Any] | None) -> dict[str, Any]:
        """What the checkpoint depends on (its file name hashes this): everything but where it is stored."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
             if k not in ("checkpoint_dir", "sadr_gamma", "sadr_hinge")}
        return dict(d, sadr=sadr)

    def checkpoint_path(self, sadr: dict[str, Any] | None) -> Path:
        h = sha256_text(dumps_line(self.recipe(sadr)))[:16]
        return Path(self.checkpoint_dir) / ("mend+sadr" if sadr else "mend") / f"mend.{h}.safetensors"


# ------------------------------------------------------------------------------------------- the hyper-network

class LowRankLayer(nn.Module):
    """x ← clamp(s_m ⊙ (U V x + b) + t_m, min=0) + x  (MEND's LRLinear with per-mode scale and shift, init "id")."""

    def __init__(self, dim: int, rank: int, n_modes: int, gen: torch.Generator):
        super().__init__()
        r = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, r))
        self.v = nn.Parameter(torch.randn(r, dim, generator=gen))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias
        return (pre * self.mode_scale[mode] + self.mode_shift[mode]).clamp(min=0) + x


class RunningNorm(nn.Module):
    """Per-feature running mean and sample standard deviation (Chan's parallel update; updated in training only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            xd = x.detach().double()
            n_b, mean_b = xd.shape[0], xd.mean(0)
            n = self.count + n_b
            diff = mean_b - self.mean
            self.m2 += ((xd - mean_b) ** 2).sum(0) + diff ** 2 * self.count * n_b / n
            self.mean += diff * n_b / n
            self.count.fill_(n)
        if self.count < 2:
            raise RuntimeError("MEND's normalisation has seen fewer than 2 rows: train the hyper-network first")
        std = (self.m2 / (self.count - 1)).sqrt()
        return ((x.double() - self.mean) / (std + 1e-7)).float()


class GradientTransform(nn.Module):
    """g_s for one weight shape (d_u inputs, d_δ outputs): normalise, concatenate, IDMLP, split."""

    def __init__(self, d_u: int, d_delta: int, rank: int, n_hidden: int, n_modes: int, gen: torch.Generator):
        super().__init__()
        self.d_u = d_u
        self.norm_u, self.norm_delta = RunningNorm(d_u), RunningNorm(d_delta)
        self.layers = nn.ModuleList(LowRankLayer(d_u + d_delta, rank, n_modes, gen) for _ in range(n_hidden + 1))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.norm_u(u), self.norm_delta(delta)], dim=-1)
        for layer in self.layers:
            x = layer(x, mode)
        return x[:, : self.d_u], x[:, self.d_u:]


class MendNet(nn.Module):
    """Every g_s of a model's edited weights and their learned steps η_ℓ."""

    def __init__(self, shapes: dict[str, tuple[int, int]], hp: MendHparams):
        super().__init__()
        self.names = list(shapes)  # weight names, in hparams order (layer-major)
        groups: dict[str, list[str]] = {}
        for name, (d_out, d_in) in shapes.items():
            groups.setdefault(f"{d_in}x{d_out}", []).append(name)
        self.mode = {name: members.index(name) for members in groups.values() for name in members}
        self.group = {name: key for key, members in groups.items() for name in members}
        gen = torch.Generator().manual_seed(hp.train_seed)
        self.transforms = nn.ModuleDict({key: GradientTransform(
            int(key.split("x")[0]), int(key.split("x")[1]), hp.rank, hp.n_hidden, len(members), gen)
            for key, members in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.names),), float(hp.edit_lr)))

    def deltas(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """ΔW_ℓ = η_ℓ Σ_t δ̃_t ũ_tᵀ for every edited weight, from its (u [T, d_in], δ [T, d_out])."""
        out = {}
        for i, name in enumerate(self.names):
            u, delta = factors[name]
            keep = (u != 0).any(-1) & (delta != 0).any(-1)
            u_t, d_t = self.transforms[self.group[name]](u[keep].float(), delta[keep].float(), self.mode[name])
            out[name] = self.edit_lrs[i] * (d_t.T @ u_t)
        return out


def edited_weights(model, hp: MendHparams) -> dict[str, tuple[int, int]]:
    """``{weight name: (d_out, d_in)}`` of the weights MEND edits, checked against the model."""
    spec = arch_for(model)
    n = spec.n_layers(model.config)
    bad = [x for x in hp.layers if x >= n]
    if bad:
        raise HparamsError(f"MEND hparams name layers {bad} but the model has {n} layers")
    out = {}
    for layer in hp.layers:
        for role in hp.modules:
            name = spec.layer(role, layer)
            w = model.get_submodule(name).weight
            out[f"{name}.weight"] = tuple(w.shape)
    return out


# ------------------------------------------------------------------------------------- gradient factors, edit

def _weights_in_graph(model, names: list[str]):
    """Only the edited weights require grad for the block (their outputs then carry a gradient path)."""
    params = dict(model.named_parameters())
    return only_grad(model, [params[n] for n in names])


def nll_at(logits: torch.Tensor, label_pos: list[int], labels: list[int]) -> torch.Tensor:
    """Mean NLL of ``labels`` predicted at ``label_pos`` of one row's logits [T, V]."""
    pos = torch.tensor(label_pos, device=logits.device)
    tgt = torch.tensor(labels, device=logits.device)
    return -F.log_softmax(logits[pos].float(), dim=-1).gather(1, tgt[:, None]).mean()


def gradient_factors(model, names: list[str], ids: torch.Tensor, mask: torch.Tensor, label_pos: list[int],
                     labels: list[int], prefix=None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """(u, δ) per edited weight for one row's edit NLL (teacher forcing), and that NLL: u from a forward hook, δ as
    the gradient of the NLL with respect to the module's output (the weights' own gradients are never formed).
    ``prefix``: a context for this forward (training passes its `PrefixCache` entry for the edit row)."""
    modules = [n.rsplit(".", 1)[0] for n in names]
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    hooks = []
    for mod_name in modules:
        def hook(_m, inp, out, key=mod_name):
            ins[key], outs[key] = inp[0].detach(), out
        hooks.append(model.get_submodule(mod_name).register_forward_hook(hook))
    try:
        with torch.enable_grad(), _weights_in_graph(model, names), prefix or contextlib.nullcontext():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = nll_at(logits[0], label_pos, labels)
            grads = torch.autograd.grad(loss, [outs[m] for m in modules])
    finally:
        for h in hooks:
            h.remove()
    return {n: (ins[m][0], g[0].detach()) for n, m, g in zip(names, modules, grads)}, loss.item()


def edit_row(tok, case, device):
    """The edit prompt + target_new[:-1] as one row, its label positions and labels (no context templates)."""
    batch = build_batch(tok, make_request(case), ["{}"], device)
    return batch, batch.input_ids[:1], batch.attention_mask[:1], batch.label_pos[0], batch.labels


def save_checkpoint(net: MendNet, path: Path, meta: dict[str, Any]) -> None:
    """The hyper-network as safetensors (byte-identical for identical tensors and metadata), written atomically."""
    from safetensors.torch import save

    from basis.io import atomic_write_bytes

    tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={"driftbench": dumps_line(meta)}))


def load_checkpoint(path: Path, shapes: dict[str, tuple[int, int]], hp: MendHparams) -> MendNet:
    from safetensors import safe_open
    from safetensors.torch import load_file

    net = MendNet(shapes, hp)
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("driftbench", "{}"))
    if meta.get("names") != net.names:
        raise HparamsError(f"{path}: a MEND checkpoint for weights {meta.get('names')}, not {net.names}")
    net.load_state_dict(load_file(str(path)))
    return net.eval()


class Mend(Editor):
    name = "mend"
    capabilities = frozenset({"sadr", "sequential"})
    undo = "weights"
    hparams_cls = MendHparams

    def __init__(self):
        self._nets: dict[str, MendNet] = {}  # loaded checkpoints by path (read-only after loading)

    def check_hparams(self, model, hparams: dict[str, Any]) -> None:
        super().check_hparams(model, hparams)
        if model is not None:  # and every edited weight exists
            edited_weights(model, MendHparams.from_dict(hparams))

    def artefacts(self, model, tok, hparams: dict[str, Any]) -> list[Artefact]:
        """The checkpoint the cell loads: MEND's for a plain cell, MEND+SADR's for a +sadr cell (``sadr`` in
        ``hparams``, as the harness passes it); both when the flag is not given."""
        hp = MendHparams.from_dict(hparams)
        flags = [bool(hparams["sadr"])] if "sadr" in hparams else [False, True]
        return [Artefact("checkpoint", str(hp.checkpoint_path(self.sadr_settings(hparams) if f else None)),
                         f"driftbench train-mend{' --sadr' if f else ''}") for f in flags]

    def net(self, model, hp: MendHparams, sadr: dict[str, Any] | None) -> MendNet:
        path = hp.checkpoint_path(sadr)
        dev = next(model.parameters()).device
        key = f"{path}@{dev}"
        if key not in self._nets:
            Artefact("checkpoint", str(path), f"driftbench train-mend{' --sadr' if sadr else ''}").sha256()
            self._nets[key] = load_checkpoint(path, edited_weights(model, hp), hp).to(dev)
        return self._nets[key]

    def apply(self, model, tok, cases, hparams: dict[str, Any], ctx) -> EditHandle:
        hp = MendHparams.from_dict(hparams)
        if ctx.steps_matched:
            raise HparamsError("MEND has no optimisation steps at edit time: a +steps cell does not apply to it")
        (case,) = cases
        t0 = time.perf_counter()
        shapes = edited_weights(model, hp)
        names = list(shapes)
        net = self.net(model, hp, ctx.sadr)
        dev = next(model.parameters()).device
        _, ids, mask, label_pos, labels = edit_row(tok, case, dev)
        factors, nll = gradient_factors(model, names, ids, mask, label_pos, labels)
        with torch.no_grad():
            deltas = net.deltas(factors)
        handle = EditHandle()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in names:
                handle.save(n, params[n])
                params[n].add_(deltas[n].to(params[n].dtype))
        handle.diagnostics = {"layers": list(hp.layers), "edit_nll_before": nll,
                              "update_norms": [float(deltas[n].norm()) for n in names],
                              "checkpoint": hp.checkpoint_path(ctx.sadr).name}
        handle.timings = {"optimise_s": time.perf_counter() - t0}
        return handle
