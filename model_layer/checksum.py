"""Bit-exact fingerprint of a model's parameters and buffers (used to prove that `restore()` is exact), computed on
the model's device: a GPU model is never copied to the host to be checked."""
from __future__ import annotations

import hashlib

import torch


_CHUNK = 1 << 22  # words per step of the on-device digest (bounds its extra memory to ~100 MB)


@torch.no_grad()
def tensor_digest(t: torch.Tensor) -> int:
    """A 64-bit digest of a tensor's raw bits, computed where the tensor lives (no copy to the host): the tensor's
    bytes as 32-bit words w_i (a 2-byte dtype pairs its elements; an odd trailing byte count is zero-padded),
    Σ_i w_i · m_i mod 2⁶⁴ with m_i = (i · 0x9E3779B97F4A7C15) | 1 odd. Any change of one word changes the digest
    (an odd multiplier is invertible mod 2⁶⁴); integer sums are exact, so the value is the same on every device
    and in every reduction order."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    raw = flat.view(torch.uint8)
    if raw.numel() % 4:
        raw = torch.cat([raw, raw.new_zeros(4 - raw.numel() % 4)])
    words = raw.view(torch.int32)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK):
        w = words[start:start + _CHUNK].to(torch.int64) & 0xFFFFFFFF
        idx = torch.arange(start, start + w.numel(), dtype=torch.int64, device=w.device)
        total += (w * ((idx * -7046029254386353131) | 1)).sum()  # 0x9E3779B97F4A7C15 as a signed 64-bit value
    return int(total.item()) & 0xFFFFFFFFFFFFFFFF


@torch.no_grad()
def _hash_tensors(h, named) -> None:
    """Feed each (name, tensor)'s name, dtype, shape, device type and on-device digest into the hash ``h``."""
    for name, p in named:
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|{tensor_digest(p):016x}".encode())


def param_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bit digest (`tensor_digest`, computed on the
    parameter's device), in ``named_parameters`` order."""
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
