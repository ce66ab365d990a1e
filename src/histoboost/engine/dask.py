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
from ..errors import EngineError
from .core import SCHEDULER_ENV, EngineSpec, Task, TaskLost

PLUGIN_NAME = "histoboost"
WORKER_WAIT_SECONDS = 300.0  # batch-queued workers may take minutes to join
SCHEMES = ("tcp", "tls", "inproc")  # Dask's own transports; ucx and websockets need packages histoboost never tests
# A Dask server speaks first: its handshake, one frame whose 8-byte length is a few hundred bytes. Another service
# (a web server, ssh) says nothing or something else, and Dask's client would take its first 8 bytes as a frame
# length and try to allocate it (an HTTP reply asked for 3 EiB). So the address is probed before Dask connects,
# waiting for the greeting at most Dask's connect timeout (distributed.comm.timeouts.connect) or GREETING_SECONDS.
MAX_HANDSHAKE_BYTES = 2**20
GREETING_SECONDS = 10.0
# Measured: peak RSS of `histoboost extract --preset quick --threads 1` on 4 BACH images (docs/scale.md).
WORKER_PEAK_GIB = 2.9
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
        from .core import _RESOURCES, _RESOURCES_LOCK

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
            # A dying worker blames every task assigned to it, queued or running (Scheduler.remove_worker); with
            # Dask's default 1.1 a 1-thread worker holds two, so an innocent image queued behind a poison one was
            # blamed twice and lost. 1.0: a worker holds only the task it runs.
            "distributed.scheduler.worker-saturation": 1.0,
        }
        self.client: Any = None  # a distributed.Client once connected; None only while connecting fails
        self.caller_environment = caller_environment
        where = address or spec.scheduler_file
        try:
            if where:
                check_scheduler(address or _address_in(str(spec.scheduler_file)), where)
            with dask.config.set(settings):
                if where:
                    # timeout: Dask's distributed.comm.timeouts.connect (30 s unless configured)
                    self.client = distributed.Client(address, scheduler_file=spec.scheduler_file)
                else:
                    self.cluster = distributed.LocalCluster(
                        n_workers=spec.workers or max(1, (os.cpu_count() or 1) // self.threads),
                        threads_per_worker=1,
                        processes=True,
                        host="127.0.0.1",
                        dashboard_address="127.0.0.1:0",
                        memory_limit=spec.memory_limit or "auto",
                    )
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
                raise EngineError(
                    f"cannot start a local Dask cluster ({reason}): check --workers and --memory-limit"
                ) from None
            raise EngineError(
                f"cannot reach the Dask scheduler at {where} ({reason}): start it (dask scheduler) "
                f"or fix --scheduler, --scheduler-file or ${SCHEDULER_ENV}"
            ) from None
        finally:
            _restore(caller_environment)
        workers = self.client.scheduler_info()["workers"].values()
        self.workers = len(workers)
        self.memory_limit = min((w["memory_limit"] for w in workers if w.get("memory_limit")), default=0)  # 0: none
        self.dashboard = self.client.dashboard_link if _has_dashboard() else None

    def _wait_for_workers(self, where: str | None) -> None:
        """At least one worker, so that tasks do not wait forever on a scheduler whose workers never came."""
        try:
            self.client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except TimeoutError:
            raise EngineError(
                f"no Dask worker joined the scheduler at {where} in {WORKER_WAIT_SECONDS:.0f} s: start "
                "workers (dask worker ADDRESS) or wait for your batch jobs, then rerun"
            ) from None

    def share(self, value: Any) -> Any:
        """Send a large argument (a feature matrix) to the workers once, not once per task."""
        return self.client.scatter(value, broadcast=True)

    def map(
        self, fn: Callable[[Task], Any], tasks: Sequence[Task], split: Callable[[Task], list[Task]] | None = None
    ) -> Iterator[tuple[Task, Any]]:
        """(task, result) as tasks finish. A task whose workers died (KilledWorker) is split by `split` and its
        pieces run again; one that cannot be split yields TaskLost. Task errors are raised here."""
        from distributed import KilledWorker, as_completed

        pending = {}
        for task in tasks:
            pending[self.client.submit(fn, task, pure=False)] = task
        finished = as_completed(list(pending))
        for future in finished:
            task = pending.pop(future)
            try:
                result = future.result()
            except KilledWorker as err:
                pieces = split(task) if split else []
                if len(pieces) > 1:
                    for piece in pieces:
                        again = self.client.submit(fn, piece, pure=False)
                        pending[again] = piece
                        finished.add(again)
                    continue
                result = TaskLost(f"its worker died every time it ran ({type(err).__name__})")
            finally:
                future.release()
            yield task, result

    def memory_note(self) -> str:
        """Why every task's worker may have died, and the fix: the workers' memory limit against what one needs."""
        limit = f"{self.memory_limit / 2**30:.2f} GiB per worker" if self.memory_limit else "none set"
        return (
            f"the workers' memory limit ({limit}) is likely below what one needs (a worker extracting the quick "
            f"preset's features peaked at {WORKER_PEAK_GIB} GiB on a 2-core test machine, more for bigger crops or "
            "networks): raise --memory-limit, run fewer workers per machine, or read the workers' logs"
        )

    def describe(self) -> dict:
        info = self.client.scheduler_info()["workers"]
        return {
            "engine": "dask",
            "scheduler": self.client.scheduler.address,
            "workers": len(info),
            "threads_per_worker": self.threads,
            "dashboard": self.dashboard,
        }

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        _restore(self.caller_environment)  # a nanny that restarted a worker has set its variables here again


def check_scheduler(address: str, where: str) -> None:
    """Refuse, in one line and before Dask reads a byte, an address of another transport, `tls://` without Dask's
    TLS settings, and a service that does not greet like a Dask scheduler."""
    import socket
    import struct

    from dask.utils import parse_timedelta
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
    except (ValueError, TypeError):
        raise EngineError(f"{where}: {address!r} is not a Dask address: give e.g. tcp://HOST:8786") from None
    if scheme not in SCHEMES:
        raise EngineError(
            f"{where}: the {scheme}:// transport is not supported: use tcp://, tls:// (with Dask's TLS "
            "settings) or inproc://"
        )
    if scheme == "tls":
        tls = dask.config.get("distributed.comm.tls", {}) or {}
        client = tls.get("client", {}) or {}
        if not (tls.get("ca-file") and client.get("cert")):
            raise EngineError(
                f"{where}: tls:// needs Dask's TLS settings: set distributed.comm.tls.ca-file and "
                "distributed.comm.tls.client.cert (and .key) in Dask's config, e.g. "
                "DASK_DISTRIBUTED__COMM__TLS__CA_FILE=ca.pem"
            )
        return  # a TLS server answers only after the TLS handshake, which Dask's client makes
    if scheme == "inproc":
        return
    seconds = min(GREETING_SECONDS, parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))
    try:
        host, port = parse_host_port(location, 8786)
        sock = socket.create_connection((host, port), timeout=seconds)
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0] or type(err).__name__
        raise EngineError(
            f"cannot reach the Dask scheduler at {where} ({reason}): start it (dask scheduler) or fix "
            f"--scheduler, --scheduler-file or ${SCHEDULER_ENV}"
        ) from None
    head = b""
    with sock:
        try:
            while len(head) < 8 and (chunk := sock.recv(8 - len(head))):
                head += chunk
        except OSError:  # silent for Dask's connect timeout, or reset: not a Dask server
            pass
    if len(head) < 8 or not 0 < struct.unpack("<Q", head)[0] <= MAX_HANDSHAKE_BYTES:
        raise EngineError(
            f"{where}: the service at {host}:{port} does not answer like a Dask scheduler: give the "
            "scheduler's address (dask scheduler prints it)"
        )


def _address_in(scheduler_file: str) -> str:
    """The address a scheduler file names (its format was checked when the flags were read)."""
    import json

    try:
        with open(scheduler_file, encoding="utf-8") as handle:
            address = json.load(handle)["address"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EngineError(
            f"{scheduler_file}: not a Dask scheduler file ({type(err).__name__}: {err}): give the file "
            "that dask scheduler --scheduler-file wrote"
        ) from None
    if not isinstance(address, str):
        raise EngineError(f"{scheduler_file}: not a Dask scheduler file (its address is not text)")
    return address


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
