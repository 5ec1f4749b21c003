"""Where a leaderboard number came from: git commit, dvc.lock entries of the stage that wrote a result file,
the params slice, the dataset version id, and the environment recorded in the rows (stdlib + yaml; no torch)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


def git_commit(cwd: str | Path = ".") -> dict[str, Any]:
    """``{"commit": sha | "unknown", "dirty": bool | None}`` of the checkout at ``cwd`` (never raises)."""
    def run(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    sha = run("rev-parse", "HEAD")
    if not sha:
        return {"commit": "unknown", "dirty": None}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": bool(status) if status is not None else None}


def read_dvc_lock(path: str | Path | None) -> dict:
    """The parsed dvc.lock, or ``{}`` when there is none (a fresh clone before ``dvc repro``)."""
    if path is None or not Path(path).is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a dvc.lock mapping; delete it and rerun `dvc repro`")
    return data


def _norm(p: str | Path) -> str:
    return Path(os.path.normpath(str(p))).as_posix()


def md5_file(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_of_output(lock: Mapping, result_file: str | Path, root: str | Path = ".") -> dict | None:
    """The dvc.lock stage whose ``outs`` include ``result_file`` (e.g. ``cell@rome+sadr``), as
    ``{"stage", "cmd", "deps": [{"path","md5","size","nfiles"}], "params": {...}, "out": {...}, "out_matches": bool}``.

    ``out_matches`` says whether the file on disk still has the md5 that DVC recorded (False: it changed after the
    last ``dvc repro``). ``None`` when no stage wrote the file (results produced outside the pipeline)."""
    stages = lock.get("stages") or {}
    try:
        rel = _norm(Path(result_file).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        rel = _norm(result_file)
    for name, st in stages.items():
        for out in st.get("outs") or []:
            if _norm(out.get("path", "")) == rel:
                actual = md5_file(Path(root) / rel) if (Path(root) / rel).is_file() else None
                return {
                    "stage": name,
                    "cmd": st.get("cmd"),
                    "deps": [{k: d.get(k) for k in ("path", "md5", "size", "nfiles") if d.get(k) is not None}
                             for d in st.get("deps") or []],
                    "params": st.get("params") or {},
                    "out": {k: out.get(k) for k in ("path", "md5", "size") if out.get(k) is not None},
                    "out_matches": actual is not None and actual == out.get("md5"),
                    "actual_md5": actual,
                }
    return None


def hparams_slice(params: Mapping | None, profile: str, model: str, base_editor: str) -> dict | None:
    """``profiles.<profile>.hparams.<model>.<editor>`` of params.yaml (None when absent)."""
    prof = ((params or {}).get("profiles") or {}).get(profile) or {}
    hp = ((prof.get("hparams") or {}).get(model) or {}).get(base_editor)
    return dict(hp) if isinstance(hp, Mapping) else None


def environments(rows: Iterable[Mapping]) -> list[dict]:
    """Distinct ``env`` dicts of the rows (package versions, device, dtype) with how many rows carry each."""
    counts: Counter = Counter(json.dumps(r.get("env") or {}, sort_keys=True) for r in rows)
    return [{"env": json.loads(k), "rows": n} for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def fingerprints(rows: Iterable[Mapping]) -> list[dict]:
    counts: Counter = Counter(str(r.get("fingerprint", "–")) for r in rows)
    return [{"fingerprint": k, "rows": n} for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]
