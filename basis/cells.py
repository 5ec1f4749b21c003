"""The cell-id grammar, parsed in exactly one place.

A cell name is ``<editor>[+sadr|+steps][.<mode>][.s<seed>]``:

- ``editor``: letters, digits, ``-`` and ``_`` (the name becomes a file name, so nothing else is accepted);
- ``+sadr``: the editor with SADR's attention-drift loss added to its optimisation;
- ``+steps``: the steps-matched control — the editor at SADR's step count (hparams ``sadr_steps``) without SADR's
  loss, so ``+sadr`` minus ``+steps`` is SADR's effect beyond the extra optimisation steps;
- ``mode`` (default: one case at a time, weights restored after each case):
  ``seq<T>``       a sequential stream of T cases edited one after the other with no restore in between,
                   every case evaluated after the whole stream (evaluation timing "final");
  ``seq<T>-each``  the same stream, each case evaluated right after its own edit (timing "each");
  ``batch<B>``     B cases edited at once by one batched update (editors with the ``batch`` capability);
  restore happens at the end of each stream or batch, and attention drift is measured against the unedited model;
- ``.s<seed>``: the context-template seed (hparams ``template_seed``); the plain name is seed 0.

A full cell id is ``<profile>/<model>/<cell name>``; the model part may itself contain ``/`` (hub ids org/name).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from basis.errors import UserError

SADR_SUFFIX = "+sadr"
STEPS_SUFFIX = "+steps"
_NAME = re.compile(r"^(?P<editor>[A-Za-z0-9][A-Za-z0-9_-]*)(?:(?P<sadr>\+sadr)|(?P<steps>\+steps))?"
                   r"(?:\.(?P<mode>seq(?P<seq>[0-9]+)(?P<each>-each)?|batch(?P<batch>[0-9]+)))?"
                   r"(?:\.s(?P<seed>[0-9]+))?$")
SINGLE, SEQUENTIAL, BATCH = "single", "seq", "batch"


class CellNameError(UserError, ValueError):
    """A cell name or cell id outside the grammar above."""


@dataclass(frozen=True)
class Mode:
    """How the cases of a cell are grouped into edit units and when they are evaluated."""
    kind: str = SINGLE  # single | seq | batch
    size: int = 1  # cases per unit
    timing: str = "each"  # "each": a case is scored right after its own edit; "final": after the whole unit

    @property
    def suffix(self) -> str:
        """The mode's part of a cell name ("" for single)."""
        if self.kind == SINGLE:
            return ""
        if self.kind == SEQUENTIAL:
            return f"seq{self.size}" + ("-each" if self.timing == "each" else "")
        return f"batch{self.size}"

    @property
    def protocol_tag(self) -> str:
        """What the editing regime adds to a metric protocol id ("" for single-case editing, e.g. "seq16-final"):
        numbers of different regimes are never pooled or ranked together."""
        if self.kind == SINGLE:
            return ""
        return f"{self.kind}{self.size}-{self.timing}"

    @property
    def label(self) -> str:
        """Human wording for tables and the site."""
        if self.kind == SINGLE:
            return "one edit at a time, restored after each case"
        what = "sequential stream" if self.kind == SEQUENTIAL else "batch"
        when = "after each edit" if self.timing == "each" else f"after all {self.size} edits"
        return f"{what} of {self.size} edits, evaluated {when}"


@dataclass(frozen=True)
class CellName:
    editor: str
    sadr: bool = False
    mode: Mode = Mode()
    seed: int | None = None
    steps: bool = False  # +steps: the steps-matched control (never together with sadr)

    @property
    def config(self) -> str:
        """The name without the seed suffix (what is averaged over seeds)."""
        return self.variant + (f".{self.mode.suffix}" if self.mode.suffix else "")

    @property
    def variant(self) -> str:
        """``editor[+sadr|+steps]`` (the editor as the leaderboard groups it, mode and seed left out)."""
        return self.editor + (SADR_SUFFIX if self.sadr else STEPS_SUFFIX if self.steps else "")

    def __str__(self) -> str:
        return self.config + ("" if self.seed is None else f".s{self.seed}")

    def with_seed(self, seed: int | None) -> "CellName":
        return CellName(self.editor, self.sadr, self.mode, seed, self.steps)


def parse_cell(name: Any, where: str = "cell") -> CellName:
    """``"memit+sadr.seq16.s2"`` → CellName("memit", True, Mode("seq", 16, "final"), 2); errors name ``where``."""
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise CellNameError(f"{where} {name!r} is not a cell name: expected <editor>[+sadr|+steps]"
                            "[.seq<T>[-each]|.batch<B>][.s<seed>], e.g. rome+sadr, rome+steps, memit.seq16 or rome.s1 "
                            "(letters, digits, '-' and '_' only)")
    if m["seq"] is not None:
        mode = Mode(SEQUENTIAL, int(m["seq"]), "each" if m["each"] else "final")
    elif m["batch"] is not None:
        mode = Mode(BATCH, int(m["batch"]), "final")
    else:
        mode = Mode()
    if mode.size < 1:
        raise CellNameError(f"{where} {name!r}: a stream or batch needs at least one case")
    cell = CellName(m["editor"], bool(m["sadr"]), mode, None if m["seed"] is None else int(m["seed"]), bool(m["steps"]))
    if str(cell) != name:  # "rome.s01", "memit.seq016": one spelling per cell, so file name and cell id agree
        raise CellNameError(f"{where} {name!r}: write it {str(cell)!r} (numbers without leading zeros)")
    if cell.editor == "none" and (cell.sadr or cell.steps or mode.kind != SINGLE):
        raise CellNameError(f"{where} {name!r}: the unedited baseline 'none' has no SADR, steps-matched, sequential "
                            "or batch variant; use 'none'")
    return cell


@dataclass(frozen=True)
class CellId:
    profile: str
    model: str
    name: CellName

    def __str__(self) -> str:
        return f"{self.profile}/{self.model}/{self.name}"


def parse_cell_id(cell: Any, error: type[UserError] = CellNameError) -> CellId:
    """``"<profile>/<model>/<cell name>"`` → CellId; ``error`` is the exception class raised (callers that read
    result files raise their own file error)."""
    parts = cell.split("/") if isinstance(cell, str) else []
    if len(parts) < 3 or not all(parts):
        raise error(f"cell id {cell!r} is not of the form '<profile>/<model>/<cell name>'")
    try:
        name = parse_cell(parts[-1], "cell id's name")
    except CellNameError as exc:
        raise error(f"cell id {cell!r}: {exc}") from None
    return CellId(parts[0], "/".join(parts[1:-1]), name)


def seeded_cells(cells: list[str], seeds: list[int], unseeded: tuple[str, ...] = ("none",)) -> list[str]:
    """The cell list a profile with template ``seeds`` must have: every single-edit editor cell once per seed (the
    first seed as the plain name, the others as ``<cell>.s<seed>``); the editors in ``unseeded`` (no randomness)
    and streams and batches (one per cell: a stream costs what a whole single-edit cell costs) once."""
    out = []
    for cell in cells:
        out.append(cell)
        c = parse_cell(cell)
        if c.editor not in unseeded and c.mode.kind == SINGLE:
            out += [f"{cell}.s{s}" for s in seeds[1:]]
    return out
