"""Tasks on Dask.distributed workers: a scheduler given by address or file, or a LocalCluster started here.

Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 and OMP/MKL/OPENBLAS_NUM_THREADS before it spawns workers, in the
calling process too, and leaves them there (dask/distributed `distributed.yaml`, `pre-spawn-environ`). Here the
caller's environment is restored, a LocalCluster's workers are spawned with histoboost's thread count and allocator
settings (`allocator.KEEP_FREED_ENVIRONMENT`: tasks run in worker threads), and a worker plugin sets torch's threads
and glibc's allocator in every worker, also on clusters histoboost did not start.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask
import distributed
from distributed import WorkerPlugin

from ..allocator import KEEP_FREED_ENVIRONMENT
from . import SCHEDULER_ENV, EngineError, EngineSpec, TaskLost

PLUGIN_NAME = "histoboost"
WORKER_WAIT_SECONDS = 300.0  # batch-queued workers may take minutes to join
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class WorkerSettings(WorkerPlugin):
    """Dask worker plugin: torch's threads and glibc's allocator as in a local run, in every worker (also those the
    nanny restarts). Settings only: models are built lazily in the task thread (`engine.process_resource`), since
    plugin code runs on the worker's event loop and a slow load there would stall its heartbeats."""

    # Not idempotent: a later run's registration replaces it on every worker, so its --threads holds (settings are
    # cheap to apply again; the teardown only lets a worker's cached model go).
    idempotent = False

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, worker=None) -> None:
        import torch

        from ..allocator import KEEP_FREED_IN_THREADS, mallopt

        torch.set_num_threads(self.threads)
        if _trim_threshold_is_dasks():  # Dask's value, not the user's choice: histoboost's setting applies
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        # Threads that already hold an arena keep it: workers started with KEEP_FREED_ENVIRONMENT need no such luck.
        mallopt(KEEP_FREED_IN_THREADS)

    def teardown(self, worker=None) -> None:
        from . import _RESOURCES, _RESOURCES_LOCK

        with _RESOURCES_LOCK:
            _RESOURCES.clear()


def _trim_threshold_is_dasks() -> bool:
    dasks = dask.config.get("distributed.nanny.pre-spawn-environ", {}).get("MALLOC_TRIM_THRESHOLD_")
    return dasks is not None and os.environ.get("MALLOC_TRIM_THRESHOLD_") == str(dasks)


class DaskEngine:
    """Tasks as Dask futures; a worker's death reruns its task elsewhere, and a task that kills workers again is
    split (its images one by one) until the input that kills is alone, then reported as lost."""

    kind = "dask"

    def __init__(self, spec: EngineSpec):
        self.threads = spec.threads or 1
        self.cluster = None
        address = spec.scheduler or (None if spec.scheduler_file else os.environ.get(SCHEDULER_ENV))
        caller_environment = dict(os.environ)
        # Variables the caller set win over these (Dask's rule): a user's allocator choice is kept.
        settings = {
            **{f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in KEEP_FREED_ENVIRONMENT.items()},
            **{f"distributed.nanny.pre-spawn-environ.{name}": str(self.threads) for name in _THREAD_VARIABLES},
            "distributed.scheduler.allowed-failures": 1,  # LocalCluster: a task may kill one worker, not two
        }
        self.client = None
        self.caller_environment = caller_environment
        where = address or spec.scheduler_file
        try:
            with dask.config.set(settings):
                if where:
                    # timeout: Dask's distributed.comm.timeouts.connect (30 s unless configured)
                    self.client = distributed.Client(address, scheduler_file=spec.scheduler_file)
                else:
                    self.cluster = distributed.LocalCluster(
                        n_workers=spec.workers or max(1, (os.cpu_count() or 1) // self.threads), threads_per_worker=1,
                        processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                        memory_limit=spec.memory_limit or "auto")
                    self.client = distributed.Client(self.cluster)
            self.client.register_plugin(WorkerSettings(self.threads), name=PLUGIN_NAME)
            self._wait_for_workers(where)
        except EngineError:
            self.close()
            raise
        except (OSError, TimeoutError, ValueError, RuntimeError) as err:
            self.close()
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if not where:
                raise EngineError(f"cannot start a local Dask cluster ({reason}): check --workers and --memory-limit")\
                    from None
            raise EngineError(f"cannot reach the Dask scheduler at {where} ({reason}): start it (dask scheduler) "
                              f"or fix --scheduler, --scheduler-file or ${SCHEDULER_ENV}") from None
        finally:
            _restore(caller_environment)
        self.workers = len(self.client.scheduler_info()["workers"])
        self.dashboard = self.client.dashboard_link if _has_dashboard() else None

    def _wait_for_workers(self, where: str | None) -> None:
        """At least one worker, so that tasks do not wait forever on a scheduler whose workers never came."""
        try:
            self.client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except TimeoutError:
            raise EngineError(f"no Dask worker joined the scheduler at {where} in {WORKER_WAIT_SECONDS:.0f} s: start "
                              "workers (dask worker ADDRESS) or wait for your batch jobs, then rerun") from None

    def share(self, value: Any) -> Any:
        """Send a large argument (a feature matrix) to the workers once, not once per task."""
        return self.client.scatter(value, broadcast=True)

    def map(self, fn: Callable, tasks: Sequence[tuple], split: Callable[[tuple], list[tuple]] | None = None
            ) -> Iterator[tuple[tuple, Any]]:
        """(task, result) as tasks finish. A task whose workers died (KilledWorker) is split by `split` and its
        pieces run again; one that cannot be split yields TaskLost. Task errors are raised here."""
        from distributed import KilledWorker, as_completed

        pending = {}
        for task in tasks:
            pending[self.client.submit(fn, *task, pure=False)] = task
        finished = as_completed(list(pending))
        for future in finished:
            task = pending.pop(future)
            try:
                result = future.result()
            except KilledWorker as err:
                pieces = split(task) if split else []
                if len(pieces) > 1:
                    for piece in pieces:
                        again = self.client.submit(fn, *piece, pure=False)
                        pending[again] = piece
                        finished.add(again)
                    continue
                result = TaskLost(f"its worker died every time it ran ({type(err).__name__})")
            finally:
                future.release()
            yield task, result

    def describe(self) -> dict:
        info = self.client.scheduler_info()["workers"]
        return {"engine": "dask", "scheduler": self.client.scheduler.address, "workers": len(info),
                "threads_per_worker": self.threads, "dashboard": self.dashboard}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        _restore(self.caller_environment)  # a nanny that restarted a worker has set its variables here again


def _restore(environment: dict[str, str]) -> None:
    """Put back the variables that differ from `environment` (only those: Dask's threads may be reading others)."""
    for name in set(os.environ) - set(environment):
        del os.environ[name]
    for name, value in environment.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _has_dashboard() -> bool:
    """Dask serves its dashboard only where bokeh is installed."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None
