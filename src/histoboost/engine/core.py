"""The engine's parts that need no Dask: its settings, the `Engine` protocol every engine follows, the local
engine, and the helpers tasks call on whichever worker runs them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..errors import EngineError

ENGINES = ("local", "dask")
SCHEDULER_ENV = "HISTOBOOST_SCHEDULER"
# A task: one small frozen dataclass of paths, names and settings (never a model), the one argument of its function.
Task = TypeVar("Task")
Item = TypeVar("Item")


@dataclass(frozen=True)
class TaskLost:
    """A task whose worker died every time it ran it (a poison input): its outcome instead of a result."""

    reason: str


@dataclass(frozen=True)
class EngineSpec:
    """How to run: `local`, or `dask` on the scheduler at `scheduler` (an address) or in `scheduler_file`; with
    neither, `dask` starts a LocalCluster of `workers` processes. `threads` is torch's and XGBoost's threads in
    each process (equal threads give equal bytes); `memory_limit` is per LocalCluster worker, e.g. "4GiB"."""

    kind: str = "local"
    scheduler: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    threads: int | None = None
    memory_limit: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise EngineError(f"unknown engine {self.kind!r}: use one of {', '.join(ENGINES)}")
        if self.kind == "local" and (self.scheduler or self.scheduler_file):
            raise EngineError("--scheduler and --scheduler-file need --engine dask")


class Engine(Protocol):
    """Where tasks run: `LocalEngine` (this process) or `dask.DaskEngine` (Dask workers)."""

    @property
    def kind(self) -> str: ...

    @property
    def threads(self) -> int | None: ...

    @property
    def workers(self) -> int: ...

    @property
    def dashboard(self) -> str | None: ...

    def share(self, value: Any) -> Any: ...

    def map(
        self, fn: Callable[[Task], Any], tasks: Sequence[Task], split: Callable[[Task], list[Task]] | None = None
    ) -> Iterator[tuple[Task, Any]]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalEngine:
    """Tasks one after the other in this process."""

    kind = "local"
    dashboard: str | None = None

    def __init__(self, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.threads = threads  # None: torch's default and XGBoost on all cores
        self.workers = 1

    def share(self, value: Any) -> Any:
        """A large argument many tasks read (a feature matrix): here, the value itself."""
        return value

    def map(
        self, fn: Callable[[Task], Any], tasks: Sequence[Task], split: Callable[[Task], list[Task]] | None = None
    ) -> Iterator[tuple[Task, Any]]:
        """(task, fn(task)) for each task, in order."""
        for task in tasks:
            yield task, fn(task)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"engine": "local", "workers": 1, "threads_per_worker": torch.get_num_threads()}

    def close(self) -> None:
        pass


def shard_of(items: Sequence[Item], shard: tuple[int, int], key: Callable[[Item], str]) -> list[Item]:
    """Share K of N (K from 1) of `items`, by a hash of each item's key: the same items whatever the order they
    come in or the machine, and every item in exactly one share (for job arrays that run no engine at all)."""
    import hashlib

    k, n = shard
    return [
        item for item in items if int.from_bytes(hashlib.sha256(key(item).encode()).digest()[:8], "big") % n == k - 1
    ]


def check_threads(threads: int) -> None:
    """Refuse to compute at another thread count than asked: a result's bytes depend on it."""
    import torch

    if torch.get_num_threads() != threads:
        raise EngineError(
            f"this process runs torch with {torch.get_num_threads()} threads, not the {threads} asked: "
            "a Dask worker needs histoboost's worker settings (registered when histoboost connects)"
        )


_RESOURCES: dict[Any, Any] = {}
_RESOURCES_LOCK = threading.Lock()


def process_resource(key: Any, factory: Callable[[], Any]) -> Any:
    """One object per process and key, built on first use (a worker's backbone or bundle): tasks carry only the
    key (names, paths, hashes), never the model, and a worker builds it once however many tasks it runs."""
    with _RESOURCES_LOCK:
        if key not in _RESOURCES:
            _RESOURCES.clear()  # one model at a time: a worker moving to another backbone frees the last one
            _RESOURCES[key] = factory()
        return _RESOURCES[key]
