"""Where and how work runs: device, batch size, tile readers, progress, cache folder and engine, made once (by the
command line or the user) and passed as one object instead of six arguments through every call."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HistoboostError
from .progress import Progress

# Augmentations per CNN batch that keep two CPU cores busy, and that fill an H100 (one image's augmentations are one
# batch unit, so A caps it).
CPU_BATCH = 8
CUDA_BATCH = 48


@dataclass(frozen=True)
class Runtime:
    """How to run, not what to compute: nothing here changes a result's bytes at a given thread count.

    `batch_size` None picks 8 on CPU and 48 on CUDA; `readers` are the threads that read slide tiles; `progress` is
    False (silent), True (bars on a terminal, a line per stage elsewhere) or "bars" (`histoboost.progress`); `engine`
    is an open engine (`histoboost.engine.open_engine`), None for this process; `feature_cache` False makes
    predictions compute features in memory instead of reading and writing the store."""

    device: str = "cpu"
    batch_size: int | None = None
    readers: int = 2
    progress: Progress = False
    cache_dir: str | Path | None = None
    engine: Any = None
    feature_cache: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise HistoboostError(f"device {self.device!r}: use cpu, cuda or cuda:N")
        if self.batch_size is not None and self.batch_size < 1:
            raise HistoboostError(f"batch size {self.batch_size}: give 1 or more")
        if self.readers < 1:
            raise HistoboostError(f"readers {self.readers}: give 1 or more")

    @property
    def batch(self) -> int:
        """The batch size in force: the one given, else what fills the device without waste."""
        return self.batch_size or (CPU_BATCH if self.device == "cpu" else CUDA_BATCH)
