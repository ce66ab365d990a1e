"""Where per-image, per-fold and per-slide work runs: in this process (the default) or on Dask workers.

Stage modules hand an engine pure tasks: paths and settings in, small records out, results written to the
store (the meeting point of all workers). The engine knows nothing of features or models, so the same task
function runs in both places and gives the same bytes at the same threads per process (see docs/scale.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import EngineError
from .core import (
    ENGINES,
    SCHEDULER_ENV,
    Engine,
    EngineSpec,
    LocalEngine,
    TaskLost,
    check_threads,
    process_resource,
    shard_of,
)

__all__ = [
    "ENGINES",
    "SCHEDULER_ENV",
    "Engine",
    "EngineError",
    "EngineSpec",
    "LocalEngine",
    "TaskLost",
    "check_threads",
    "open_engine",
    "process_resource",
    "shard_of",
]


@contextmanager
def open_engine(spec: EngineSpec | None = None) -> Iterator[Engine]:
    """The engine for `spec`, closed (its LocalCluster shut down, the caller's environment restored) at the end."""
    spec = spec or EngineSpec()
    engine: Engine
    if spec.kind == "local":
        engine = LocalEngine(spec.threads)
    else:
        try:
            from .dask import DaskEngine
        except ImportError:
            raise EngineError("--engine dask needs Dask.distributed: pip install 'histoboost[dask]'") from None
        engine = DaskEngine(spec)
    try:
        yield engine
    finally:
        engine.close()
