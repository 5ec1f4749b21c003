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
