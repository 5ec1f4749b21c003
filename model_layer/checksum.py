"""Bit-exact fingerprint of a model's parameters (used to prove that `restore()` is exact)."""
from __future__ import annotations

import hashlib

import torch


@torch.no_grad()
def _hash_tensors(h, named) -> None:
    """Feed each (name, tensor)'s name, dtype, shape and raw bytes into the hash ``h``."""
    for name, p in named:
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def param_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and raw bytes, in ``named_parameters`` order."""
    h = hashlib.sha256()
    _hash_tensors(h, model.named_parameters())
    return h.hexdigest()


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, rel: float, seed: int = 0) -> None:
    """w ← w · (1 + rel · z), z ~ N(0, 1) per element from a seeded generator, for every floating parameter: a
    relative perturbation far below fp32 training noise, to measure how far a result moves on numerics alone."""
    gen = torch.Generator().manual_seed(seed)
    for _name, p in model.named_parameters():
        if p.dtype.is_floating_point:
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
            p.mul_(1 + rel * z)


def _library_hook(fn) -> bool:
    """Hooks transformers installs on itself the first time attentions are asked for (and keeps): not an edit."""
    fn = getattr(fn, "func", fn)  # functools.partial
    return str(getattr(fn, "__module__", "") or "").startswith("transformers.")


def model_state(model: torch.nn.Module, editor=None) -> tuple[str, str, str | None]:
    """What a restore must bring back bit-exactly, for every kind of undo: the parameters (weight edits), the module
    tree — each submodule's name, class, identity, registered hooks and buffers — (module swaps, routers), and the
    editor's side state (state resets)."""
    tree = hashlib.sha256()
    _hash_tensors(tree, model.named_buffers())
    for name, m in model.named_modules():
        hooks = [[k for k, fn in getattr(m, attr, {}).items() if not _library_hook(fn)]
                 for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")]
        tree.update(f"{name}|{type(m).__qualname__}|{id(m)}|{hooks}\n".encode())
    digest = editor.state_digest() if editor is not None and hasattr(editor, "state_digest") else None
    return param_checksum(model), tree.hexdigest(), digest
