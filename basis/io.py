"""Atomic, crash-safe file helpers shared by every room (stdlib only, no torch).

Rules they implement (design.md §6): a reader never sees a half-written file (write a temp file in the same
folder, fsync, rename; the file gets the user's umask like any other), and an append-only JSONL log survives
``kill -9`` at any byte: a torn *last* line (no newline: the only thing a killed writer can leave) is dropped on the
next open, so resuming never loses a complete line nor duplicates one. Anything else that does not parse — a bad
line in the middle, a merge-conflict marker, a duplicate key, invalid UTF-8, NaN/Infinity, absurd nesting — is an
error naming the file and line, and nothing is changed on disk. One process at a time writes an output
(:class:`OutputLock`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from basis.errors import UserError

MAX_DEPTH = 64  # no file of ours nests deeper than ~8; deeper input is refused before anything walks it


class JsonInputError(UserError, ValueError):
    """A JSON/JSONL input that is not what we write: names the file (and line) and what to do."""


def dumps_line(obj: Any) -> str:
    """Canonical one-line JSON (sorted keys, no spaces, UTF-8 kept) so equal objects give equal bytes. NaN and
    Infinity are refused (ValueError): they are not JSON, and no reader here accepts them."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(obj: Any) -> int:
    """Levels of nested containers (``1`` → 0, ``[1]`` → 1, ``[[]]`` → 2), counted up to ``MAX_DEPTH + 1``."""
    depth, level = 0, [o for o in [obj] if isinstance(o, (dict, list))]
    while level and depth <= MAX_DEPTH:
        depth += 1
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, (dict, list))]
    return depth


def loads_strict(data: bytes | str, where: str) -> Any:
    """Parse one JSON document as our readers accept it: UTF-8, no duplicate keys, no NaN/Infinity, nesting at most
    ``MAX_DEPTH``. Anything else raises :class:`JsonInputError` starting with ``where`` (e.g. ``file:line``)."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise JsonInputError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise JsonInputError(f"{where}: JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:
        raise JsonInputError(f"{where}: not valid JSON ({exc})") from None
    if _depth(obj) > MAX_DEPTH:
        raise JsonInputError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    return obj


def read_json(path: str | os.PathLike) -> Any:
    """One JSON file, parsed with :func:`loads_strict` (a missing file raises FileNotFoundError)."""
    return loads_strict(Path(path).read_bytes(), str(path))


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either the old one or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an output is as readable as any file the user makes
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(dumps_line(r) + "\n" for r in rows))


def parse_jsonl(data: bytes, where: str, hint: str = "") -> list[Any]:
    """Every line of JSONL bytes (blank lines skipped) through :func:`loads_strict`; the first bad line raises
    :class:`JsonInputError` naming ``where:line`` (plus ``hint``)."""
    rows = []
    for no, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            try:
                rows.append(loads_strict(line, f"{where}:{no}"))
            except JsonInputError as exc:
                raise JsonInputError(f"{exc}{hint}") from None
    return rows


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Each JSON value of a finished JSONL file; a bad line raises JsonInputError naming file and line number."""
    yield from parse_jsonl(Path(path).read_bytes(), str(path), "; fix or remove that line (or the file, to recompute it)")


class AppendLog:
    """Append-only JSONL log that is safe against ``kill -9``.

    On open, every complete line (ending in a newline) must parse (:func:`loads_strict`), else
    :class:`JsonInputError` names the file and line and the file is left exactly as it was; the bytes after the last
    newline — a torn last line, what ``kill -9`` during a write leaves — are truncated away. Each ``append`` writes
    one whole line and fsyncs before returning, so a line is either entirely on disk or (after the next open)
    entirely absent.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = self._recover()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> list[dict]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        good_end = raw.rfind(b"\n") + 1  # everything after the last newline is a torn last line
        rows = parse_jsonl(raw[:good_end], str(self.path),
                           "; only a torn last line is dropped automatically, so nothing was changed: fix or remove "
                           "that line (a merge conflict? two writers?) and rerun")
        if good_end != len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
        return rows

    def append(self, row: dict) -> None:
        self._fh.write(dumps_line(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.rows.append(row)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OutputLock:
    """An exclusive, per-output lock held for a whole run (``fcntl.flock`` on ``lock_path``, released by the kernel
    when the process dies, so a killed run never leaves a stale lock). A second process asking for the same output
    gets a :class:`UserError` naming the holder's pid instead of doing the same work twice and interleaving lines;
    with ``wait`` it waits its turn instead (short critical sections such as a merge)."""

    def __init__(self, lock_path: str | os.PathLike, what: str, wait: bool = False):
        self.path, self.what, self.wait, self._fh = Path(lock_path), what, wait, None

    def __enter__(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "unknown"
            fh.close()
            raise UserError(f"{self.what} is already running (pid {pid}; lock {self.path}): wait for it to finish "
                            "or stop it, then rerun") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
