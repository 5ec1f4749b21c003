"""The editor registry: name -> editor class (built-ins imported only when asked for; third parties by entry point).

Kept apart from `editors/base.py` on purpose: registering a new editor must not change the code every cell's
fingerprint hashes (`evaluators/harness.EDITOR_CORE`) — the mapping itself decides no number; the class it names is
hashed through `Editor.code_files`, and `dvc.yaml` lists that file per cell (tests/test_contracts.py checks both).
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from basis.errors import UserError
from editors.base import Editor, as_v2

# name -> "module:Class" (imported only when asked for) or the class itself
_BUILTINS: dict[str, Any] = {"none": "editors.none:NoEdit", "rome": "editors.rome:Rome", "memit": "editors.memit:Memit",
                             "rome_awd": "editors.rome_awd:RomeAWD",
                             "alphaedit": "editors.alphaedit:AlphaEdit", "pmet": "editors.pmet:Pmet",
                             "ft": "editors.ft:FineTune", "intattn": "editors.intattn:IntAttn", "mend": "editors.mend:Mend",
                             "wise": "editors.wise:Wise"}


def available_editors() -> list[str]:
    names = set(_BUILTINS)
    names.update(ep.name for ep in entry_points(group="driftbench.editors"))
    return sorted(names)


class UnknownEditorError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def get_editor(name: str) -> Editor:
    """The editor registered as ``name`` (built-in, imported only when asked for, or an entry point)."""
    import importlib

    if name in _BUILTINS:
        factory = _BUILTINS[name]
        if isinstance(factory, str):
            mod, cls = factory.split(":")
            factory = getattr(importlib.import_module(mod), cls)
        return as_v2(factory())
    for ep in entry_points(group="driftbench.editors"):
        if ep.name == name:
            return as_v2(ep.load()())
    raise UnknownEditorError(f"unknown editor {name!r}; available: {available_editors()}. "
                             "Third-party editors register an entry point in the group 'driftbench.editors'.")
