"""Replay the blocks below an edit: for loops that change nothing under block L — WISE's side-memory steps, MEND's
post-edit forwards in training — the blocks 0..L−1 run once per input row and later forwards of that row replay
their output (`model_layer.hooks.capture` then `replay_prefix`), with bit-identical results (tests/test_wise.py,
tests/test_mend.py). An editor that imports this module lists it in its `code_files` (it is part of its cells'
fingerprint and of their DVC dependencies)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from model_layer.arch import arch_for
from model_layer.hooks import capture, replay_prefix

FILE = Path(__file__).resolve()


class PrefixCache:
    """The first forward of each input (named by the caller's ``key``) runs the blocks and keeps the last one's
    output; later forwards of that input replay it. Blocks that return tuples are never cached (the replay returns
    bare hidden states)."""

    def __init__(self, blocks: list[torch.nn.Module]):
        self.blocks = list(blocks)
        self.out: dict[str, torch.Tensor] = {}

    @classmethod
    def below(cls, model, layer: int, enabled: bool = True) -> "PrefixCache":
        """The cache of blocks 0..layer−1 of ``model`` (an empty one, which replays nothing, when not ``enabled``)."""
        arch = arch_for(model)
        return cls([model.get_submodule(arch.layer("block", i)) for i in range(layer)] if enabled else [])

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        if not self.blocks:
            yield
        elif key in self.out:
            with replay_prefix(self.blocks, self.out[key]):
                yield
        else:
            with capture(self.blocks[-1]) as cap:
                yield
            if cap and not cap["tuple"]:
                self.out[key] = cap["out"]
