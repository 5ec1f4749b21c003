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


def read_dvc_lock(path: str | Path | Iterable[str | Path] | None, root: str | Path = ".") -> dict:
    """The parsed dvc.lock, or ``{}`` when there is none (a fresh clone before ``dvc repro``).

    Several lock files (the default pipeline's and ``pipelines/editors/dvc.lock``) merge into one mapping: a stage
    of a lock file below ``root`` is named as DVC addresses it (``pipelines/editors/dvc.yaml:memit_family@pmet``),
    and each stage records its ``lock`` file. Output paths stay as written: every stage of this repository runs with
    the repository root as its working directory (``wdir: ../..``), so they are root-relative in every lock."""
    if path is None:
        return {}
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    merged: dict = {"stages": {}}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            continue
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict) or not isinstance(data.get("stages") or {}, dict):
            raise ValueError(f"{p}: not a dvc.lock mapping; delete it and rerun `dvc repro`")
        try:
            rel = _norm(p.resolve().relative_to(Path(root).resolve()))
        except ValueError:  # a lock outside the checkout: named as given, its stages as the root's
            rel = _norm(p)
        where = _norm(Path(rel).parent) if not Path(rel).is_absolute() else "."
        prefix = "" if where == "." else f"{where}/dvc.yaml:"
        for name, st in (data.get("stages") or {}).items():
            merged["stages"][prefix + name] = dict(st or {}, lock=rel)
    return merged if merged["stages"] else {}


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
                    "lock": st.get("lock", "dvc.lock"),
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
