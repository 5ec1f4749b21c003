"""Every forward hook the editors and probes use, in one place: add a vector at chosen token positions of a
module's output (`inject`), read a module's input and output (`capture`), and stop the forward pass as soon as a
module's input is known (`run_until`), and replay the layers below a point from a cached output (`replay_prefix`).
Each is a context manager that removes its hook on exit, even on error."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch


class StopForward(Exception):
    """Raised inside a pre-hook to skip the layers above the captured module."""


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def inject(module: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor,
           delta: Callable[[], torch.Tensor], on_first: Callable[[torch.Tensor], None] | None = None) -> Iterator[None]:
    """Add ``delta()`` to the module's output hidden states at (rows[i], positions[i]) in every forward; ``on_first``
    receives the output of the first forward before anything is added (e.g. to read v_init)."""
    seen = [False]

    def hook(_m, _inp, out):
        hs = _hidden(out)
        if not seen[0]:
            seen[0] = True
            if on_first is not None:
                on_first(hs)
        hs = hs.clone()
        hs[rows, positions] = hs[rows, positions] + delta().to(hs.dtype)
        return (hs,) + tuple(out[1:]) if isinstance(out, tuple) else hs

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(module: torch.nn.Module) -> Iterator[dict[str, torch.Tensor | None]]:
    """Yield a dict that holds ``in`` (the first positional input; None when the module gets its hidden states as a
    keyword) and ``out`` (the output hidden states) of the module's last forward, detached, and ``tuple`` (whether
    the module returned a tuple rather than the bare hidden states)."""
    cap: dict[str, torch.Tensor | None] = {}

    def hook(_m, inp, out):
        cap["in"] = inp[0].detach() if inp else None
        cap["out"] = _hidden(out).detach()
        cap["tuple"] = isinstance(out, tuple)

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


@contextmanager
def run_until(module: torch.nn.Module, sink: list[torch.Tensor]) -> Iterator[None]:
    """Append the module's input to ``sink`` and stop the forward there (callers catch `StopForward`)."""
    def hook(_m, inp):
        sink.append(inp[0].detach())
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def replay_prefix(blocks: list[torch.nn.Module], output: torch.Tensor) -> Iterator[None]:
    """Skip the transformer blocks ``blocks`` (the bottom ones, in order): the lower ones pass their input through
    and the last returns ``output`` (its cached output) — for loops whose change enters at or above the last
    block, where everything below is the same at every step. Forward hooks of the last block still run."""
    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states

    def cached(*args, **kwargs):
        return output

    for b in blocks[:-1]:
        b.forward = passthrough
    blocks[-1].forward = cached
    try:
        yield
    finally:
        for b in blocks:
            del b.forward  # the class's forward again
