"""The Ray backend (evaluators.cluster) on a local cluster of two CPU workers and a tiny model: the merged cell file
is byte-identical to the local backend's; a worker killed mid-run is replaced and its unit rerun, with nothing lost
or duplicated; an interrupted driver resumes from its parts; a worker with another code identity is refused."""
from __future__ import annotations

import functools
import json

import pytest
import ray  # the `ray` extra is in the lock: `make install` installs it

from evaluators import runner
from evaluators.harness import CellSpec, ROOT, parts_root, run_cell, run_pre, worker_identity
from model_layer.loading import load_model
from test_more_editors import ft_hparams
from test_rome_sadr import CASES, TINY_CASE


CELL_CASES = CASES + [TINY_CASE]
SPEC = CellSpec("test", "tiny", "ft", True, ft_hparams(num_steps=3, sadr_steps=3))


@pytest.fixture(scope="module")
def cluster():
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tiny_model_dirs, tmp_path_factory):
    """The local backend's files (pre rows and the cell) — what every Ray run must reproduce byte for byte."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count (part of the fingerprint); put back for the tests after this one
    try:
        d = tmp_path_factory.mktemp("local")
        model, tok = load_model(str(tiny_model_dirs["llama"]))
        run_pre(model, tok, "tiny", "test", CELL_CASES, d / "pre.jsonl", progress=False)
        run_cell(model, tok, SPEC, "test", CELL_CASES, d / "pre.jsonl", d / "cell.jsonl", progress=False)
    finally:
        torch.set_num_threads(threads)
    return d


def _ray(local, tiny_model_dirs, out, **kw):
    from evaluators.cluster import run_on_ray

    build = functools.partial(__import__("cluster_jobs").tiny_cell_job, str(tiny_model_dirs["llama"]), SPEC,
                              CELL_CASES, str(local / "pre.jsonl"))
    kw.setdefault("identity", worker_identity("ft"))
    kw.setdefault("workers", 2)
    return run_on_ray(build, editor="ft", out_path=out, parts=parts_root(out), progress=False,
                      desc="test", pythonpath=f"{ROOT}:{ROOT / 'tests'}", **kw)


@pytest.fixture(scope="module")
def interrupted_then_resumed(cluster, local, tiny_model_dirs, tmp_path_factory):
    """One scenario, two Ray runs (each run starts two actors, the suite's dearest step): the driver is interrupted
    after one stored unit; the rerun resumes, and the worker that delivered its first result is killed while idle,
    with a unit still to be sent to it. Killing the other, busy worker instead would race: its unit may already be
    finished when the kill lands, and then nothing is lost (CI saw that once). The idle one deterministically gets the
    next unit, which fails with the dead actor and must be rerun on a replacement."""
    out = tmp_path_factory.mktemp("ray") / "cell.jsonl"

    def stop(ev):
        if ev["done"] == 1:
            raise KeyboardInterrupt

    assert len(CELL_CASES) >= 4  # the rerun must have a unit left to send after its first result
    with pytest.raises(KeyboardInterrupt):
        _ray(local, tiny_model_dirs, out, on_result=stop)
    file_after_interrupt = out.exists()
    killed = []

    def kill_one(ev):
        if not killed:  # after the rerun's first stored unit, kill the worker that just went idle
            killed.append(ev["actor"])
            ray.kill(ev["actor"], no_restart=True)

    res = _ray(local, tiny_model_dirs, out, on_result=kill_one)
    return {"out": out, "res": res, "killed": killed, "file_after_interrupt": file_after_interrupt}


def test_two_workers_merge_the_local_backends_bytes(interrupted_then_resumed, local):
    out = interrupted_then_resumed["out"]
    assert out.read_bytes() == (local / "cell.jsonl").read_bytes()  # every case once, in plan order
    timings = [json.loads(x) for x in out.with_name("cell.timings.jsonl").read_text().splitlines()]
    assert [t["case_id"] for t in timings] == [c.case_id for c in CELL_CASES]


def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_duplicated(interrupted_then_resumed):
    res = interrupted_then_resumed["res"]
    assert interrupted_then_resumed["killed"] and res["restarts"] == 1
    store = runner.PartStore(parts_root(interrupted_then_resumed["out"]), res["fingerprint"])
    assert len(list(store.dir.glob("*.json"))) == len(CELL_CASES)  # one part per unit: none lost, none twice


def test_an_interrupted_driver_resumes_from_its_parts(interrupted_then_resumed):
    assert not interrupted_then_resumed["file_after_interrupt"]  # an interrupted driver merges nothing
    # the unit stored before the interrupt is not computed again (a killed worker's unit is, once)
    assert interrupted_then_resumed["res"]["ran"] == len(CELL_CASES) - 1


def test_a_worker_with_other_code_is_refused(cluster, local, tiny_model_dirs, tmp_path):
    from basis.errors import UserError

    wrong = dict(worker_identity("ft"), code="0" * 16)
    with pytest.raises(UserError, match=r"refused: its code [0-9a-f]{16} \(driver: 0{16}\) differ"):
        _ray(local, tiny_model_dirs, tmp_path / "cell.jsonl", identity=wrong, workers=1)  # one actor says it
    assert not (tmp_path / "cell.jsonl").exists()
