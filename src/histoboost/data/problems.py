"""What is wrong with a data set, one `Problem` per file, collected in bounded memory (`_Problems`)."""

from __future__ import annotations

import io
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import DataError

_PRINTED = 50  # up to this many problems are all returned; past it, the first `_SHOWN` of each kind
_SHOWN = 5


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file: what, and how to fix it."""

    path: Path
    message: str
    fix: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message} ({self.fix})"


class _Problems:
    """The problems of one data set, counted as they are found. Up to `_PRINTED` are all kept; past it, every
    one is streamed to a text file (`path`) and only the first `_SHOWN` of each kind (severity and fix) are
    kept: a million bad rows cost neither memory nor a million lines on the terminal."""

    def __init__(self, path: Path):
        self.path = path  # where the full list goes, when there is one
        self.kept: list[Problem] = []
        self.counts: Counter[tuple[str, str]] = Counter()
        self._file: io.TextIOWrapper | None = None
        self._tmp: Path | None = None

    @property
    def errors(self) -> int:
        return sum(n for (severity, _), n in self.counts.items() if severity == "error")

    def append(self, problem: Problem) -> None:
        kind = (problem.severity, problem.fix)
        self.counts[kind] += 1
        if self._file is None and len(self.kept) < _PRINTED:
            self.kept.append(problem)
            return
        file = self._file if self._file is not None else self._open()
        file.write(f"{problem}\n")
        if self.counts[kind] <= _SHOWN:
            self.kept.append(problem)

    def extend(self, problems) -> None:
        for problem in problems:
            self.append(problem)

    def _open(self) -> io.TextIOWrapper:
        """Start the file of every problem (beside the manifest, else a temporary file) with those kept so far,
        then keep only the first few of each kind."""
        from ..storage import temporary_for

        try:
            self._tmp = temporary_for(self.path)
            self._file = open(self._tmp, "x", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 - closed by finish()
        except OSError:  # a read-only data folder
            handle, name = tempfile.mkstemp(prefix=f"{self.path.name.removesuffix('.txt')}.", suffix=".txt")
            self.path = self._tmp = Path(name)
            self._file = open(handle, "w", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 - closed by finish()
        shown: Counter[tuple[str, str]] = Counter()
        held, self.kept = self.kept, []
        for problem in held:
            self._file.write(f"{problem}\n")
            shown[problem.severity, problem.fix] += 1
            if shown[problem.severity, problem.fix] <= _SHOWN:
                self.kept.append(problem)
        return self._file

    def finish(self) -> list[Problem]:
        """The problems to show: all of them, or the first few of each kind and a last one naming the file."""
        if self._file is None or self._tmp is None:  # _open sets both
            return self.kept
        self._file.close()
        os.replace(self._tmp, self.path)
        total, errors = sum(self.counts.values()), self.errors
        return [
            *self.kept,
            Problem(
                self.path,
                f"{total:,} problems ({errors:,} error(s), {total - errors:,} warning(s)), too many to print: "
                f"the first {_SHOWN} of each kind are shown",
                "this file lists them all",
                "error" if errors else "warning",
            ),
        ]

    def failure(self, message: str) -> DataError:
        """The DataError that ends validation, naming the file of every problem when there is one."""
        problems = self.finish()
        listed = f"; all {sum(self.counts.values()):,} problems are listed in {self.path}" if self._file else ""
        return DataError(message + listed, tuple(problems))

    def __enter__(self) -> _Problems:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None and not self._file.closed:  # stopped by an error: no half list
            self._file.close()
            if self._tmp is not None:  # _open sets both
                self._tmp.unlink(missing_ok=True)
