"""Right-padded batches of token-id rows (every editor and probe indexes absolute positions: spec §8 gotcha 3)."""
from __future__ import annotations

import torch


def right_pad(rows: list[list[int]], pad_id: int | None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` → (input_ids, attention_mask), both [len(rows), max_len], padded on the right."""
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return (ids.to(device), mask.to(device)) if device is not None else (ids, mask)
