"""Progress of long work: a bar on a terminal, one line per stage in a log.

tqdm draws bars well but, written to a file, every refresh becomes bytes in the log; its own `disable=None` hides
the bar off a terminal and says nothing at all. What a log needs is in between, and that is the one thing written
here by hand: the stage's name, its count and its time, once, when the stage ends.

`progress` is False (nothing), True (a bar on a terminal, a line otherwise) or "bars" (a bar wherever stderr goes:
`--progress`, or a notebook, whose output is not a terminal).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, Literal, TypeVar

Progress = bool | Literal["bars"]
_COUNTED = frozenset({"fold", "step", "tile"})  # units a line says in the plural ("img" and "B" stay as they are)
T = TypeVar("T")


class StageLine:
    """A stand-in for a tqdm bar off a terminal: counts quietly, writes one line when closed."""

    def __init__(self, desc: str, total: int | None, unit: str, initial: int = 0, quiet: bool = False):
        self.desc, self.total, self.unit, self.initial, self.quiet = desc, total, unit, initial, quiet
        self.n = initial
        self.start = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Bars show it as they go; a log line does not."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.quiet:
            return
        done = f"{self.n} of {self.total}" if self.total is not None and self.n != self.total else str(self.n)
        reused = f" ({self.initial} done before)" if self.initial else ""
        unit = f"{self.unit}s" if self.unit in _COUNTED and self.n != 1 else self.unit
        print(
            f"{self.desc}: {done} {unit}{reused} in {time.perf_counter() - self.start:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StageLine:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is not None:  # a stage that failed: its error says so, no line that looks like a finished stage
            self.quiet = True
        self.close()


def meter(
    desc: str, total: int | None, unit: str = "img", progress: Progress = True, initial: int = 0, leave: bool = True
) -> Any:
    """A bar to `update(n)` and `close()`: tqdm's where a person watches (`leave` it drawn when done), else a
    `StageLine` (silent when `progress` is False)."""
    if progress == "bars" or (progress and _on_terminal()):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
    return StageLine(desc, total, unit, initial, quiet=not progress)


def track(
    items: Iterable[T], desc: str, total: int | None = None, progress: Progress = True, leave: bool = True
) -> Iterator[T]:
    """`items` (images), yielded as they come, with a `meter` over them."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    bar = meter(desc, total, "img", progress, leave=leave)
    for item in items:  # a stage that raises gets no line (tqdm's bar is closed when collected)
        yield item
        bar.update(1)
    bar.close()


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False
