"""Atomic, crash-safe file helpers shared by every room (stdlib only, no torch).

Rules they implement (design.md §6): a reader never sees a half-written file (write a temp file in the same
folder, fsync, rename), and an append-only JSONL log survives ``kill -9`` at any byte: a torn last line is
dropped on the next open, so resuming never loses a complete line nor duplicates one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def dumps_line(obj: Any) -> str:
    """Canonical one-line JSON (sorted keys, no spaces, UTF-8 kept) so equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either the old one or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield each JSON object of a JSONL file; a bad line raises ValueError naming file and line number."""
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{no}: not valid JSON ({exc.msg}); delete the file to recompute it") from None


class AppendLog:
    """Append-only JSONL log that is safe against ``kill -9``.

    On open, complete lines are kept and a torn tail (no trailing newline, or not parseable JSON) is truncated
    away. Each ``append`` writes one whole line and fsyncs before returning, so a line is either entirely on
    disk or (after the next open) entirely absent.
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
        rows, good_end, pos = [], 0, 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl < 0:
                break  # torn tail: no newline
            line = raw[pos:nl]
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # torn or corrupt: drop it and everything after
            good_end = pos = nl + 1
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
