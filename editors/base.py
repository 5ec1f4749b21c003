"""The `Editor` protocol, edit handles with exact restore, and the registry (built-ins + entry points).

An editor is ``edit(model, tok, case, hparams) -> EditHandle``. The handle's ``restore()`` must leave every
touched tensor bit-identical to before the edit (checked per case by the harness behind ``--verify-restore``).
Third-party editors register under the entry-point group ``driftbench.editors`` (``name = "pkg.module:Class"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol

import torch

from data_pipeline.schema import Case
from driftbench.errors import UserError


@dataclass
class EditHandle:
    """Originals of the tensors an edit overwrote (copied before writing); ``restore`` copies them back."""
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # deterministic facts, stored in the result row
    timings: dict[str, Any] = field(default_factory=dict)  # wall-clock figures, stored in the timings sidecar
    restored: bool = False

    def save(self, name: str, param: torch.nn.Parameter) -> None:
        """Record ``param`` before the first write to it (later calls for the same name are no-ops)."""
        if name not in self.originals:
            self.originals[name] = param.detach().clone()
            self.params[name] = param

    def restore(self) -> None:
        with torch.no_grad():
            for name, orig in self.originals.items():
                self.params[name].copy_(orig)
        self.restored = True


class Editor(Protocol):
    name: str
    supports_sadr: bool

    def edit(self, model: torch.nn.Module, tok, case: Case, hparams: dict[str, Any]) -> EditHandle: ...

    # optional: ``check_hparams(model, hparams) -> None`` raises driftbench.errors.UserError for hyper-parameters the
    # editor cannot run with; the harness calls it before any output is touched.


class NoEdit:
    """The unedited baseline: post-edit scores are the model's own (a determinism check for the harness)."""
    name = "none"
    supports_sadr = False

    def check_hparams(self, model, hparams: dict[str, Any]) -> None:
        extra = sorted(set(hparams) - {"sadr", "template_seed"})
        if extra:
            raise UserError(f"the unedited baseline 'none' takes no hyper-parameters, got {extra}")

    def edit(self, model, tok, case, hparams) -> EditHandle:
        return EditHandle()


_BUILTINS: dict[str, Callable[[], Editor] | str] = {"none": NoEdit, "rome": "editors.rome:Rome",
                                                    "memit": "editors.memit:Memit"}


def _construct(factory: Callable[[], Editor] | str) -> Editor:
    if isinstance(factory, str):  # "module:Class", imported only when asked for
        import importlib

        mod, cls = factory.split(":")
        return getattr(importlib.import_module(mod), cls)()
    return factory()


def available_editors() -> list[str]:
    names = set(_BUILTINS)
    names.update(ep.name for ep in entry_points(group="driftbench.editors"))
    return sorted(names)


class UnknownEditorError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def get_editor(name: str) -> Editor:
    if name in _BUILTINS:
        return _construct(_BUILTINS[name])
    for ep in entry_points(group="driftbench.editors"):
        if ep.name == name:
            return ep.load()()
    raise UnknownEditorError(f"unknown editor {name!r}; available: {available_editors()}. "
                   "Third-party editors register an entry point in the group 'driftbench.editors'.")
