"""The editor contract (v2): what an editor declares and how its effect is undone (the registry: editors/registry.py).

An editor is a class with

- ``name`` and ``capabilities`` ⊆ {"sadr", "sequential", "batch", "changes_forward"}: may run with SADR's extra
  loss; may be applied case after case without a restore in between; can edit many cases in one update; changes the
  model's forward itself (a module swap, a router) rather than only weight values;
- ``undo`` ∈ {"weights", "modules", "state"}: how `EditHandle.restore` puts the model back — copying saved tensors
  back, swapping the original modules back in, or resetting the editor's side state (``state_digest`` then names
  that state, so the harness can check the reset bit-exactly);
- ``artefacts(model, tok, hparams)``: the files it needs (second moments, null-space projections, trained
  hyper-networks), each content-named, produced by a DVC stage, and hashed into the cell's fingerprint (the
  harness passes the cell's SADR flag as ``hparams["sadr"]``);
- ``apply(model, tok, cases, hparams, ctx) -> EditHandle``: edit one case (or, with "batch", several at once).
  SADR is not built by editors: ``ctx.extra_losses(first_layer)`` returns the framework's loss terms (SADR's,
  when the cell asks for it, with its reference attention taken from the unedited model), which any optimisation
  loop — a target-vector loop, a weight fine-tuning loop, a hyper-network's training loss — adds to its own.

The harness (evaluators.harness) checks after every unit that parameters, the module tree and the editor's state
are bit-identical to before (`model_layer.checksum.model_state`). Editors written against the first contract
(``edit(model, tok, case, hparams) -> EditHandle``) keep working through `LegacyEditor`. Third-party editors
register under the entry-point group ``driftbench.editors`` (``name = "pkg.module:Class"``; `editors.registry`).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from basis.errors import UserError
from data_pipeline.schema import Case

CAPABILITIES = frozenset({"sadr", "sequential", "batch", "changes_forward"})
UNDO_KINDS = ("weights", "modules", "state")


class HparamsError(UserError, ValueError):
    """Hyper-parameters an editor cannot run with (unknown name, wrong type, out of range for the model)."""


@dataclass(frozen=True)
class Artefact:
    """A file an editor needs, made by a DVC stage; ``sha256`` enters the fingerprint of every row it shaped."""
    kind: str  # "second_moment" | "projection" | "checkpoint" | ...
    path: str  # content-named file inside a DVC output folder
    stage: str  # the command that produces it, for the error message

    def sha256(self) -> str:
        from basis.io import sha256_file

        p = Path(self.path)
        if not p.is_file():
            raise UserError(f"{self.kind} artefact {p} not found: run `{self.stage}` first")
        return sha256_file(p)


@dataclass
class EditHandle:
    """Everything one edit changed, so `restore` can undo it exactly: tensors copied before the first write to
    them (``save``), modules swapped in (``swap``), side-state resets (``on_restore``)."""
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]] = field(default_factory=list)
    resets: list[Callable[[], None]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # deterministic facts, stored in the result row
    # in-memory facts later edits of the same unit read (AlphaEdit: the keys this edit wrote); never stored, and
    # gone with the handle when the unit is restored, so nothing carries over to the next case or cell
    memo: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)  # wall-clock figures, stored in the timings sidecar
    restored: bool = False

    def save(self, name: str, param: torch.nn.Parameter) -> None:
        """Record ``param`` before the first write to it (later calls for the same name are no-ops)."""
        if name not in self.originals:
            self.originals[name] = param.detach().clone()
            self.params[name] = param

    def swap(self, model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
        """Put ``new`` in place of the submodule ``name``; returns the original (restored by `restore`)."""
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self.swaps.append((parent, attr, old, new))
        return old

    def on_restore(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on restore (after modules and weights are back), e.g. to clear a side memory."""
        self.resets.append(fn)

    def _put_back(self) -> None:
        with torch.no_grad():
            for parent, attr, old, _new in reversed(self.swaps):
                setattr(parent, attr, old)
            for name, orig in self.originals.items():
                self.params[name].copy_(orig)

    def restore(self) -> None:
        self._put_back()
        for fn in reversed(self.resets):
            fn()
        self.restored = True

    @contextmanager
    def reverted(self) -> Iterator[None]:
        """The model as before this edit for the duration of the block, then edited again (bit-exactly): used to
        take SADR's reference attention from the unedited model in the middle of a stream of edits."""
        if self.resets:
            raise RuntimeError("an edit with side-state resets (EditHandle.on_restore) cannot be reverted for a "
                               "moment: SADR's reference in a stream needs its weights or modules only")
        edited = {n: p.detach().clone() for n, p in self.params.items()}
        self._put_back()
        try:
            yield
        finally:
            with torch.no_grad():
                for parent, attr, _old, new in self.swaps:
                    setattr(parent, attr, new)
                for name, value in edited.items():
                    self.params[name].copy_(value)


class EditContext:
    """What the framework hands an editor for one unit of work (a case, a stream, a batch): the extra loss terms
    of the cell (SADR when it is a ``+sadr`` cell) and access to the unedited model."""

    def __init__(self, model, sadr: dict[str, Any] | None = None, steps_matched: bool = False):
        self.model = model
        self.sadr = sadr  # {"gamma": γ, "hinge": bool} for a +sadr cell, else None
        self.steps_matched = steps_matched  # a +steps cell: SADR's step count without SADR's loss (the control)
        self.handles: list[EditHandle] = []  # edits applied so far in this unit, oldest first

    @property
    def sadr_step_count(self) -> bool:
        """Optimise for SADR's step count (hparams ``sadr_steps``) instead of the editor's own: +sadr and +steps."""
        return self.sadr is not None or self.steps_matched

    @property
    def pristine(self) -> bool:
        """No edit of this unit has been applied yet (the model is the unedited one)."""
        return not self.handles

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """The unedited model for the duration of the block (every edit of the unit reverted, newest first)."""
        with _nested([h.reverted() for h in reversed(self.handles)]):
            yield

    def extra_losses(self, first_layer: int = 0) -> list:
        """The framework's extra loss terms for an optimisation whose change enters the model above layer
        ``first_layer - 1`` (a hint that skips layers whose term is exactly 0): SADR's for a +sadr cell."""
        if self.sadr is None:
            return []
        from editors.sadr import SADRLoss

        reference = None if self.pristine else self._reference_attentions
        return [SADRLoss(self.sadr["gamma"], hinge=self.sadr.get("hinge", True), first_layer=first_layer,
                         reference=reference)]

    def _reference_attentions(self, batch, first_layer: int) -> dict:
        """SADR's reference rows ``{layer: [N, H, T]}`` on ``batch`` from the model with this unit's edits reverted."""
        from model_layer.attention import attention_rows

        rows = torch.arange(batch.n_rewrite, device=batch.query_idx.device)
        with torch.no_grad(), self.unedited(), attention_rows(self.model, rows, batch.query_idx, first_layer) as att:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       logits_to_keep=1)
        return dict(att)

    def push(self, handle: EditHandle) -> None:
        self.handles.append(handle)

    def restore_all(self) -> None:
        for h in reversed(self.handles):
            h.restore()
        self.handles.clear()


@contextmanager
def _nested(managers: Sequence) -> Iterator[None]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


class Editor:
    """Base class of contract-v2 editors (see the module docstring); subclasses set the class attributes and
    implement `apply`."""
    name: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    undo: ClassVar[str] = "weights"
    # the editor's hyper-parameter dataclass (editors.core.Hparams: from_dict, edit_layers, sadr_gamma, sadr_hinge)
    hparams_cls: ClassVar[type | None] = None
    # SADR in a stream (+sadr with .seq<T>) needs the unedited forward mid-stream (EditContext.unedited): an editor
    # whose edits cannot be reverted temporarily (WISE's routing hook) says False, and such cells are refused up front
    sadr_in_streams: ClassVar[bool] = True

    def check_hparams(self, model, hparams: dict[str, Any]) -> None:
        """Raise a UserError for hyper-parameters this editor cannot run with (``model`` None: names, types and
        ranges only; the harness adds the cell's SADR flag as ``hparams["sadr"]``). Called before any output is
        touched. By default: they parse (`hparams_cls.from_dict`) and every layer they edit exists in ``model``."""
        if self.hparams_cls is None:
            return
        hp = self.hparams_cls.from_dict(hparams)
        if model is None:
            return
        from model_layer.arch import arch_for

        n = arch_for(model).n_layers(model.config)
        bad = [x for x in hp.edit_layers() if x >= n]
        if bad:
            raise HparamsError(f"{hp.editor} hparams name layer(s) {bad} but the model has {n} layers (0-{n - 1})")

    def artefacts(self, model, tok, hparams: dict[str, Any]) -> list[Artefact]:
        return []

    def prepare(self, model, tok, hparams: dict[str, Any], progress: bool = True) -> list[str]:
        """Produce the artefacts (the DVC stage calls this); returns one line per artefact."""
        return []

    def sadr_settings(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """SADR's weight γ and hinge for a +sadr cell of this editor (hparams ``sadr_gamma``, ``sadr_hinge``)."""
        if self.hparams_cls is not None:
            hp = self.hparams_cls.from_dict(hparams)
            return {"gamma": hp.sadr_gamma, "hinge": hp.sadr_hinge}
        return {"gamma": float(hparams.get("sadr_gamma", 1e-2)), "hinge": bool(hparams.get("sadr_hinge", True))}

    def state_digest(self) -> str | None:
        """A digest of the editor's side state (for ``undo = "state"``), compared before and after a restore."""
        return None

    def apply(self, model, tok, cases: list[Case], hparams: dict[str, Any], ctx: EditContext) -> EditHandle:
        raise NotImplementedError

    def apply_each(self, model, tok, cases: list[Case], hparams: dict[str, Any], ctx: EditContext
                   ) -> Iterator[EditHandle]:
        """Independent edits of ``cases``: yields case i's handle, its edit applied alone to the unedited model; the
        caller restores it before taking the next. An editor may share work between the cases (locate-then-edit
        editors optimise every v* in one batched loop: editors.core.optimise_targets); by default one `apply`
        each."""
        for case in cases:
            yield self.apply(model, tok, [case], hparams, ctx)

    def edit(self, model, tok, case: Case, hparams: dict[str, Any]) -> EditHandle:
        """One case on the unedited model, SADR when ``hparams["sadr"]`` (the first contract's call, kept for
        scripts and tests; the harness calls `apply`)."""
        hp = {k: v for k, v in hparams.items() if k != "sadr"}
        ctx = EditContext(model, self.sadr_settings(hp) if hparams.get("sadr") else None)
        return self.apply(model, tok, [case], hp, ctx)

    def code_files(self) -> list[Path]:
        """The source files of this editor proper (the shared core is added by the harness): the module of its class
        and of every class it inherits from (PMET's cells also run MEMIT's write), in inheritance order."""
        files: list[Path] = []
        for cls in type(self).__mro__:
            src = inspect.getsourcefile(cls) if cls is not object else None
            if src is not None and Path(src).resolve() not in files:
                files.append(Path(src).resolve())
        return files


class LegacyEditor(Editor):
    """Adapter for a first-contract editor: ``edit(model, tok, case, hparams) -> EditHandle`` with
    ``hparams["sadr"]`` as the SADR flag and ``supports_sadr``; weights restored by its handle."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.capabilities = frozenset({"sadr", "sequential"} if getattr(inner, "supports_sadr", False)
                                      else {"sequential"})

    def check_hparams(self, model, hparams):
        if hasattr(self.inner, "check_hparams"):
            self.inner.check_hparams(model, hparams)

    def prepare(self, model, tok, hparams, progress=True):
        return self.inner.prepare(model, tok, hparams, progress) if hasattr(self.inner, "prepare") else []

    def apply(self, model, tok, cases, hparams, ctx):
        (case,) = cases
        return self.inner.edit(model, tok, case, dict(hparams, sadr=ctx.sadr is not None))

    def code_files(self):
        return [Path(inspect.getsourcefile(type(self.inner))).resolve()]


def as_v2(obj) -> Editor:
    """A contract-v2 editor for ``obj`` (itself when it already is one)."""
    if isinstance(obj, Editor):
        return obj
    if callable(getattr(obj, "edit", None)):
        return LegacyEditor(obj)
    raise UserError(f"{type(obj).__name__} is not an editor: it needs apply(...) (driftbench.editors contract v2, "
                    "subclass editors.base.Editor) or edit(model, tok, case, hparams)")
