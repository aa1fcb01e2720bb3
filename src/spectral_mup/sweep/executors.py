"""Executors: how a sweep's runs are trained and their results come back to the driver.

``local``: a spawn process pool with the cores split between workers (one worker runs in
this process); ``ray``: the same run function as a Ray task. Each calls ``on_result(run,
result)`` in the driver as runs finish (``result`` None: the worker died).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .. import train
from ..config import RunConfig
from ..errors import ConfigError, SmupError
from .spec import Run
from .stacks import stack_checkpoint

# ----------------------------------------------------------------------------- one run


def _train_run(cfg: RunConfig) -> dict[str, Any]:
    return train.run(cfg, log=None)


def execute(cfg: RunConfig) -> dict[str, Any]:
    """Train one run; never raises for an ordinary exception: a failure is a result
    (status ``failed``, ``error`` = exception type and first line of its message)."""
    try:
        result = _train_run(cfg)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return {"status": "failed", "error": error[:500]}
    return {k: result.get(k) for k in KEEP}


# a run's result as the driver stores it
KEEP = (
    "status",
    "best_val_loss",
    "final_val_loss",
    "final_train_loss",
    "diverged_at",
    "iters",
    "tokens",
    "wall_time",
)


def execute_task(cfgs: list[RunConfig]) -> list[dict[str, Any]]:
    """Each run's result (``execute``'s keys) for a task of ``sweep.stacks.plan``: one run
    alone, several as one stack; a stack that cannot be built (or fails) is retrained one
    run at a time, so every run gets its own status."""
    if len(cfgs) == 1:
        return [execute(cfgs[0])]
    try:
        results = train.train_stacked(cfgs, checkpoint=stack_checkpoint(cfgs))
    except Exception:  # NotBatchable, or one run's error: each run alone says which
        return [execute(cfg) for cfg in cfgs]
    return [{k: r.get(k) for k in KEEP} for r in results]


def _task_with_threads(cfgs: list[RunConfig], threads: int) -> list[dict[str, Any]]:
    _set_threads(threads)
    return execute_task(cfgs)


def _set_threads(threads: int) -> None:
    """A worker's setup: its torch threads, and malloc keeping freed memory (as ``smup``)."""
    import torch

    torch.set_num_threads(threads)
    train.keep_freed_memory()


# ----------------------------------------------------------------------------- executors

OnResult = Callable[[Run, dict[str, Any] | None], None]  # None: the run was lost
Task = list[Run]  # runs trained together (sweep.stacks: one, or a stack of one shape)


def _report(task: Task, results: list[dict[str, Any]] | None, on_result: OnResult) -> None:
    for i, run in enumerate(task):
        on_result(run, None if results is None else results[i])


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def run_local(tasks: list[Task], workers: int, on_result: OnResult) -> None:
    """A spawn process pool of ``workers`` processes, each with cores // workers torch
    threads, training one task at a time; one worker runs in this process."""
    threads = max(1, available_cores() // workers)
    if workers == 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for task in tasks:
                _report(task, execute_task([r.config for r in task]), on_result)
        finally:
            torch.set_num_threads(before)
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_set_threads,
        initargs=(threads,),
    )
    # SIGTERM (kill, pkill, a scheduler's stop) would end this process at once and orphan
    # the workers, which then train on for hours: turn it into an exit that stops them
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _exit_on_signal) if in_main else None
    try:
        futures: dict[Future, Task] = {
            pool.submit(execute_task, [r.config for r in task]): task for task in tasks
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    results = future.result()
                except BrokenProcessPool:
                    results = None
                _report(futures[future], results, on_result)
    except BaseException:
        # Ctrl-C or a store error: stop the runs in flight (they resume from their
        # checkpoints next time) instead of waiting for them to finish
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_handler)
    pool.shutdown(wait=True)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SmupError(
            "--executor ray needs Ray: pip install 'spectral-mup[ray]' (or use --executor local)"
        ) from None
    return ray


def check_reachable(address: str | None) -> None:
    """Fail fast on a cluster address nothing listens at (Ray itself retries for minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address must look like HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise SmupError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); "
            "start one with `ray start --head` or fix --address"
        ) from None


def run_ray(
    tasks: list[Task],
    workers: int,
    on_result: OnResult,
    *,
    address: str | None = None,
    cpus_per_run: int = 0,
) -> None:
    """Each task a Ray task (``num_cpus`` = ``cpus_per_run``, else the cluster's CPUs //
    ``workers``, else 1), at most ``workers`` in flight; results return to the driver."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        check_reachable(address)
        kwargs: dict[str, Any] = {
            "address": address,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        if address is None:
            kwargs["include_dashboard"] = False
        env = {k: os.environ[k] for k in ("SMUP_DATA_DIR",) if os.environ.get(k)}
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or "a local Ray instance"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SmupError(f"cannot start or reach Ray at {where}: {reason}") from None
        started = True
    try:
        if cpus_per_run:
            cpus = cpus_per_run
        elif workers:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
        else:
            cpus = 1
        remote = ray.remote(num_cpus=cpus, max_retries=0)(_task_with_threads)
        limit = workers or len(tasks)
        queue = list(tasks)
        in_flight: dict[Any, Task] = {}
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                task = queue.pop(0)
                in_flight[remote.remote([r.config for r in task], cpus)] = task
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                task = in_flight.pop(ref)
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayError:  # the worker died; the task is not a result
                    results = None
                _report(task, results, on_result)
    finally:
        if started:
            ray.shutdown()
