"""Bit-exact fingerprint of a model's parameters (used to prove that `restore()` is exact)."""
from __future__ import annotations

import hashlib

import torch


def param_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and raw bytes, in ``named_parameters`` order."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
