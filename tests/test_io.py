"""basis.io: the kill-safe append log and the atomic writers (design.md §6)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from basis.io import (AppendLog, JsonInputError, OutputLock, atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text,
                           dumps_line, read_jsonl)

ROWS = [{"case_id": "cf-1", "v": 1.5}, {"case_id": "wd-2", "v": [1, 2]}, {"case_id": "cf-3", "text": "Zürich"}]


def _write_log(path: Path, rows, tail: bytes = b"") -> bytes:
    good = "".join(dumps_line(r) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(good + tail)
    return good


def _leftovers(folder: Path, name: str) -> list[str]:
    """Temp files the atomic writers would leave next to ``name`` (``.<name>.*.tmp``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") or p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------ AppendLog
@pytest.mark.parametrize("tail", [
    b'{"case_id": "cf-4", "v": 2',                     # torn mid-object, no newline
    b'{"case_id": "cf-4", "v": 2}',                    # a whole object but its newline never made it
    '{"case_id": "cf-4", "text": "Zü'.encode()[:-1],   # cut inside a multi-byte UTF-8 character
    b'{"case_id": "cf-4", "v": 2}\n{"case_',           # one more complete line, then a torn one
])
def test_appendlog_drops_torn_tail_and_keeps_complete_lines(tmp_path, tail):
    path = tmp_path / "log.jsonl"
    good = _write_log(path, ROWS, tail)
    complete_extra = tail.startswith(b'{"case_id": "cf-4", "v": 2}\n')
    with AppendLog(path) as log:
        expected = ROWS + ([{"case_id": "cf-4", "v": 2}] if complete_extra else [])
        assert log.rows == expected
    # the torn bytes are gone from disk, every complete line is still there byte for byte
    data = path.read_bytes()
    assert data == good + (b'{"case_id": "cf-4", "v": 2}\n' if complete_extra else b"")
    assert list(read_jsonl(path)) == expected


def test_appendlog_append_after_recovery_starts_on_a_clean_line(tmp_path):
    path = tmp_path / "log.jsonl"
    _write_log(path, ROWS, b'{"case_id": "torn')
    with AppendLog(path) as log:
        log.append({"case_id": "new", "v": 0})
        log.append({"case_id": "new2", "v": None})
        assert [r["case_id"] for r in log.rows] == ["cf-1", "wd-2", "cf-3", "new", "new2"]
    with AppendLog(path) as log:  # reopening finds exactly those rows, nothing to truncate
        assert [r["case_id"] for r in log.rows] == ["cf-1", "wd-2", "cf-3", "new", "new2"]
    assert path.read_bytes().endswith(b'{"case_id":"new2","v":null}\n')
    assert b"torn" not in path.read_bytes()


def test_appendlog_only_torn_bytes_and_missing_file(tmp_path):
    path = tmp_path / "only_torn.jsonl"
    path.write_bytes(b'{"case_id": "x", "sc')
    with AppendLog(path) as log:
        assert log.rows == []
    assert path.read_bytes() == b""
    fresh = tmp_path / "sub" / "fresh.jsonl"  # parent folder created, file created empty
    with AppendLog(fresh) as log:
        assert log.rows == []
        log.append({"a": 1})
    assert fresh.read_bytes() == b'{"a":1}\n'


def test_appendlog_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a":1}\n\n{"a":2}\n')
    with AppendLog(path) as log:
        assert log.rows == [{"a": 1}, {"a": 2}]
    assert path.read_bytes() == b'{"a":1}\n\n{"a":2}\n'


WRITER = """
import sys
from basis.io import AppendLog
log = AppendLog(sys.argv[1])
i = len(log.rows)
while True:
    log.append({"i": i, "pad": "x" * 20000})
    i += 1
"""


def test_appendlog_survives_sigkill_of_a_writer(tmp_path):
    """A real ``kill -9`` of a process appending big rows as fast as it can: after each kill the log holds a gapless
    prefix 0..k-1 of complete rows, and a second writer continues where the first stopped."""
    path = tmp_path / "log.jsonl"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    total = 0
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env)
        deadline = time.monotonic() + 60
        while (not path.exists() or path.stat().st_size < (total + 20) * 20000) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with open(path, "ab") as fh:  # and a torn half-line on top, as if killed inside write()
            fh.write(b'{"i": 99999, "pad": "xx')
        with AppendLog(path) as log:
            ids = [r["i"] for r in log.rows]
        assert ids == list(range(len(ids))) and len(ids) > total
        total = len(ids)
    assert path.read_bytes().endswith(b"\n")


# ------------------------------------------------------------------------------------------ atomic writers
def test_atomic_writers_write_complete_files_and_leave_no_temp(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    atomic_write_jsonl(tmp_path / "r.jsonl", [{"b": 2, "a": 1}, {"z": "ü"}])
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2], "b": 1}
    assert (tmp_path / "j.json").read_text().endswith("}\n")
    assert (tmp_path / "r.jsonl").read_bytes() == '{"a":1,"b":2}\n{"z":"ü"}\n'.encode("utf-8")
    atomic_write_jsonl(tmp_path / "r.jsonl", [])  # overwrite with an empty log
    assert (tmp_path / "r.jsonl").read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]


def test_atomic_write_json_unserialisable_leaves_original(tmp_path):
    path = tmp_path / "card.json"
    atomic_write_json(path, {"ok": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"ok": 2, "bad": object()})
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path.name) == []
    with pytest.raises(TypeError):
        atomic_write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"b": {1, 2}}])
    assert not (tmp_path / "rows.jsonl").exists()
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_atomic_write_failure_mid_way_keeps_original_and_removes_temp(tmp_path, monkeypatch, fail_at):
    """The data is written to a temp file; a failure before the rename leaves the old file and no temp file."""
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"old":1}\n')
    seen_during_write = []

    def failing_fsync(fd):
        seen_during_write.append(path.read_bytes())  # what a concurrent reader would see right now
        raise OSError("disk full (simulated)")

    def failing_replace(src, dst):
        seen_during_write.append(path.read_bytes())
        assert Path(src).read_bytes() == b'{"new":2}\n' and Path(src).parent == tmp_path
        raise OSError("rename failed (simulated)")

    if fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", failing_fsync)
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_jsonl(path, [{"new": 2}])
    assert seen_during_write == [b'{"old":1}\n']
    assert path.read_bytes() == b'{"old":1}\n'
    assert _leftovers(tmp_path, path.name) == []


def test_reader_never_sees_partial_file(tmp_path, monkeypatch):
    """At the moment of the rename the new content is complete in the temp file, and the target still holds the
    complete old content: there is no instant at which the target is partial."""
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"v": "old"})
    real_replace = os.replace
    snapshots = []

    def spying_replace(src, dst):
        snapshots.append((json.loads(Path(src).read_text()), json.loads(Path(dst).read_text())))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spying_replace)
    big = {"v": "new", "rows": list(range(50_000))}
    atomic_write_json(path, big)
    assert snapshots == [(big, {"v": "old"})]
    assert json.loads(path.read_text()) == big
    assert _leftovers(tmp_path, path.name) == []


# ------------------------------------------------------------------------------------------------ helpers
def test_dumps_line_is_canonical():
    assert dumps_line({"b": 1, "a": {"d": 2, "c": "é"}}) == '{"a":{"c":"é","d":2},"b":1}'
    assert dumps_line({"a": 1, "b": 2}) == dumps_line({"b": 2, "a": 1})


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a":1}\n\n{"a":\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        list(read_jsonl(path))


# ------------------------------------------------------------------------------------------------ issue 11: corruption
@pytest.mark.parametrize("bad, what", [
    (b'{"case_id": "cf-4", "v"\n', "not valid JSON"),          # a partial line that ends in a newline: not a torn tail
    (b"<<<<<<< HEAD\n", "not valid JSON"),                     # a merge-conflict marker
    (b'{"case_id": "cf-4", "case_id": "x"}\n', "duplicate key"),
    (b'{"case_id": "cf-4", "v": NaN}\n', "NaN is not a JSON number"),
    (b'{"case_id": "cf-4", "v": Infinity}\n', "Infinity"),
    (b'{"case_id": "\xff\xfe"}\n', "not valid UTF-8"),
    (b"[" * 200 + b"]" * 200 + b"\n", "nested"),
])
def test_appendlog_refuses_a_bad_complete_line_and_changes_nothing(tmp_path, bad, what):
    """Only a torn *last* line may be dropped: a bad complete line in the middle is an error naming file and line,
    and the file keeps every byte (issue 11 item 3: a bad line 2 of 4 used to cut the file to 1 row)."""
    path = tmp_path / "log.jsonl"
    good = _write_log(path, ROWS[:1])
    rest = "".join(dumps_line(r) + "\n" for r in ROWS[1:]).encode()
    path.write_bytes(good + bad + rest + b'{"torn')
    before = path.read_bytes()
    with pytest.raises(JsonInputError, match=what) as exc:
        AppendLog(path)
    assert f"{path}:2:" in str(exc.value)
    assert path.read_bytes() == before
    with pytest.raises(JsonInputError, match=f"{path}:2:"):
        list(read_jsonl(path))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_dumps_line_refuses_nan():
    with pytest.raises(ValueError):
        dumps_line({"v": float("nan")})


def test_output_lock_refuses_a_second_process(tmp_path):
    lock = tmp_path / "out.lock"
    code = ("import sys, time; from basis.io import OutputLock\n"
            f"with OutputLock({str(lock)!r}, 'x'):\n    print('held', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"already running \\(pid {proc.pid}"):
            with OutputLock(lock, "results/x.jsonl"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with OutputLock(lock, "x"):  # the kernel dropped the dead holder's lock: no stale lock file blocks a rerun
        assert lock.read_text().strip() == str(os.getpid())
