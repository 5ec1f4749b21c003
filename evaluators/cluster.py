"""The runner on a Ray cluster: the same plan → units → store → merge as `evaluators.runner`, with the units
executed by a pool of Ray actors (one per GPU or CPU slot) instead of this process.

- **Workers**: each actor checks that its code and installed set equal the driver's (`harness.worker_identity`;
  a worker with another checkout or lock is refused with a one-line message naming what differs), then builds the
  job once (``build()``: loads the model, scorer, statistics and artefacts, fixes the fingerprint) and executes
  many units, restoring between them (the harness checks every restore).
- **Driver**: takes the first worker's plan and refuses any worker whose fingerprint differs (other model file,
  artefacts, hyper-parameters); skips units that already have a part (a killed driver resumes); sends units to idle
  workers and takes results in completion order; writes each result as its part through the runner's store
  (`runner.record`); and merges once every unit has one (`runner.merge`), so the cell file is byte-identical to
  the local backend's whatever the order, the number of workers or the failures.
- **Failures**: a unit whose worker died (actor lost: a killed process, a lost node) goes back to the queue and runs
  on another worker; a replacement worker is started, up to ``max_restarts`` in all. An exception inside ``compute``
  (a bug, a refused restore) is not retried: it stops the run with the worker's error, and the parts written so far
  stay for the next run.
- ``address=None`` starts a local cluster of ``workers`` actors; ``address="auto"`` or ``"ray://host:10001"`` joins
  an existing one. Workers import the code from ``PYTHONPATH`` = this checkout on a local cluster; on a real
  cluster every node needs the same checkout and lock (the identity check enforces it).

Ray is an optional extra (``pip install driftbench[ray]``, in the lock); nothing else imports this module.
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from basis.errors import UserError
from evaluators import runner


class IdentityMismatch(UserError):
    """A worker runs other code or another installed set than the driver."""


def _differences(mine: dict, theirs: dict) -> list[str]:
    return [f"{k} {mine.get(k)} (driver: {theirs.get(k)})" for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k)]


class CellWorker:
    """The actor's class (decorated with ``ray.remote`` when the pool starts, so importing this module needs no Ray)."""

    def __init__(self, build: Callable[[], Any], identity: dict, editor: str, threads: int | None = None):
        import os
        import socket

        if threads:
            import torch

            torch.set_num_threads(threads)
        from evaluators.harness import worker_identity

        self.where = f"{socket.gethostname()} pid {os.getpid()}"
        self.error: Exception | None = None  # raised by plan(): an error in a constructor would lose its type
        diff = _differences(worker_identity(editor), identity)
        if diff:
            self.error = IdentityMismatch(f"worker on {self.where} refused: its {', '.join(diff)} differ from "
                                          "the driver's; install the same lock and checkout on every node")
            return
        try:
            self.job = build()
        except UserError as exc:  # a missing file, a bad setting: the driver reports it in one line
            self.error = UserError(f"worker on {self.where}: {exc}")
            return
        self.units = {u.index: u for u in self.job.plan.units}

    def plan(self) -> runner.Plan:
        if self.error is not None:
            raise self.error
        return self.job.plan

    def compute(self, index: int) -> tuple[list[dict], list[dict], float]:
        t0 = time.perf_counter()
        rows, timings = self.job.compute(self.units[index])
        return rows, timings, time.perf_counter() - t0


def _init(address: str | None, workers: int, pythonpath: str) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        import os

        # Ray starts workers at niceness 15 (to keep its own daemons responsive); here the workers are the
        # computation, as this process is on the local backend: same priority (else any other load starves them)
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, runtime_env=env)


def run_on_ray(build: Callable[[], Any], identity: dict, editor: str, out_path: Path, parts: Path,
               workers: int = 2, address: str | None = None, resources: dict | None = None,
               threads: int | None = None, max_restarts: int = 2, progress: bool = True, desc: str = "",
               pythonpath: str | None = None, on_result: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every unit of the job ``build()`` makes on ``workers`` Ray actors and merge the output.

    ``build`` must be picklable (a module-level function or a functools.partial of one): each actor calls it.
    ``resources``: per actor, e.g. ``{"num_gpus": 1}`` or ``{"num_cpus": 1}`` (default). ``on_result`` gets
    ``{"unit", "actor", "actors", "done"}`` after each stored unit (progress, tests). Returns ``{"rows" (merged),
    "ran" (units computed now), "fingerprint", "restarts", "per_unit_s" (compute seconds per unit)}``."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from tqdm.auto import tqdm

    from evaluators.harness import ROOT

    _init(address, workers, pythonpath or str(ROOT))
    remote = ray.remote(CellWorker).options(**(resources or {"num_cpus": 1}), max_restarts=0)

    def start():
        return remote.remote(build, identity, editor, threads)

    def plan_of(actor) -> runner.Plan:
        try:
            return ray.get(actor.plan.remote())
        except ray.exceptions.RayTaskError as exc:  # the worker refused (identity) or could not build the job
            if isinstance(exc.cause, UserError):
                raise UserError(str(exc.cause)) from None
            raise

    actors = [start() for _ in range(workers)]
    plans = [plan_of(a) for a in actors]
    plan = plans[0]
    for i, p in enumerate(plans[1:], 1):
        if p.fingerprint != plan.fingerprint or p.units != plan.units:
            raise UserError(f"{desc}: worker {i} planned fingerprint {p.fingerprint}, worker 0 {plan.fingerprint}: "
                            "its model files, artefacts or data differ; give every node the same files")
    store = runner.PartStore(parts, plan.fingerprint)
    runner.adopt(Path(out_path), plan, store)
    todo = deque(runner.missing_units(plan, store))
    n_cases = sum(len(u.case_ids) for u in plan.units)
    bar = tqdm(total=n_cases, initial=n_cases - sum(len(u.case_ids) for u in todo), desc=f"{desc} [ray ×{workers}]",
               unit="case", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    idle, in_flight, ran, restarts, per_unit = list(actors), {}, 0, 0, []
    try:
        while todo or in_flight:
            while idle and todo:
                actor, unit = idle.pop(), todo.popleft()
                in_flight[actor.compute.remote(unit.index)] = (actor, unit)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, unit = in_flight.pop(ref)
            try:
                rows, timings, seconds = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:  # not an error inside compute
                todo.appendleft(unit)  # lost with its worker: run it elsewhere
                actors.remove(actor)
                if restarts >= max_restarts:
                    if not actors:
                        raise RuntimeError(f"{desc}: every worker died ({restarts} restarts); parts written so far "
                                           "are kept, rerun to resume") from exc
                    continue
                restarts += 1
                new = start()
                if plan_of(new).fingerprint != plan.fingerprint:
                    raise UserError(f"{desc}: a replacement worker planned another fingerprint")
                actors.append(new)
                idle.append(new)
                continue
            runner.record(plan, store, unit, rows, timings)
            ran += 1
            per_unit.append(seconds)
            idle.append(actor)
            bar.update(len(unit.case_ids))
            if on_result is not None:
                on_result({"unit": unit, "actor": actor, "actors": list(actors), "done": ran})
    finally:
        bar.close()
        for a in actors:  # also ends the units still in flight (their results are not needed: no part is written)
            ray.kill(a)
    rows = runner.merge(Path(out_path), plan, store)
    return {"rows": rows, "ran": ran, "fingerprint": plan.fingerprint, "restarts": restarts, "per_unit_s": per_unit}
