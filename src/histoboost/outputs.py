"""Writing results so that they are whole or absent: checked before any work, staged, then renamed.

A run folder is written into a hidden staging folder beside it and renamed into place at the end, so
an interrupted run leaves nothing that looks complete and never mixes two runs; a staging folder whose
writer was killed is cleared by the next run there, as the store's temporaries are (`storage`). Nothing
that exists is overwritten unless the user said `--force`. CSV cells that a spreadsheet would run as a
formula are neutralised (OWASP's advice for CSV injection).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import storage
from .errors import OutputError

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
RUN_MARKER = "config.json"  # every run folder histoboost writes has one
_STAGING = ".staging-"  # in the name of a staging folder: .NAME.staging-RANDOM.HOST.PID.RANDOM.tmp


def check_output(path: Path, force: bool = False, folder: bool = True) -> Path:
    """Refuse, before any work, an output that exists (unless `force`, and then only a file, an empty
    folder or a histoboost run folder), is the wrong kind, or whose parent folder cannot be written."""
    path = Path(path).absolute()
    if path.exists() or path.is_symlink():
        if not force:
            raise OutputError(f"{path} exists: choose another --out, or pass --force to replace it")
        if folder != path.is_dir():
            raise OutputError(
                f"{path} is {'a file' if path.is_file() else 'a folder'}: give "
                f"{'a folder' if folder else 'a file name'} for --out"
            )
        if folder and any(path.iterdir()) and not (path / RUN_MARKER).is_file():
            raise OutputError(
                f"{path} holds files but is no histoboost run folder (no {RUN_MARKER}): --force "
                "replaces only run folders; choose another --out"
            )
    if not folder and not path.parent.is_dir():
        raise OutputError(f"{path.parent}: no such folder for --out {path}: create it first")
    check_writable(path.parent)  # a run folder's missing parents are made when it is written
    return path


def check_writable(folder: Path) -> Path:
    """Refuse, before any work, a folder (made later if missing) where nothing can be written: its nearest
    existing ancestor is tried with a real file, since permission bits say nothing to root or about a
    read-only mount."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.is_dir() and not (existing.exists() or existing.is_symlink()):
        existing = existing.parent
    if not existing.is_dir():
        below = "" if existing == folder else f", so {folder} cannot be made"
        raise OutputError(f"{existing} is not a folder{below}: choose another --out")
    if storage.server_now(existing) is None:
        raise OutputError(f"{existing}: cannot write there (read-only, full or no permission): choose another --out")
    return folder


@contextmanager
def staged_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """A new hidden folder beside `out` to write into, renamed to `out` when the block ends without error
    and removed when the block fails. `out` is checked by the caller before the work (`check_output`);
    should it have appeared since, or the rename fail, the finished results stay in the staging folder
    and the error says where. The staging folder is named after its writer and guarded by a lease, so a
    killed run's is cleared here by the next one (`storage.clear_abandoned`), and only such folders."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    storage.clear_abandoned(out.parent, pattern=f".*{_STAGING}*.tmp")
    with storage.Lease(out.parent):
        staging = Path(
            tempfile.mkdtemp(
                prefix=f".{out.name[:100]}{_STAGING}", suffix=f".{storage.writer_id()}.tmp", dir=out.parent
            )
        )
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            if out.exists() and force:
                _exchange(staging, out)  # the new run in place, the old one in the staging name
                shutil.rmtree(staging, ignore_errors=True)
            else:
                os.rename(staging, out)  # fails, rather than replaces, if `out` appeared meanwhile
        except OSError as err:
            raise OutputError(
                f"{out}: could not be put in place ({err.strerror}); the finished results are in {staging}"
            ) from None


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step, so no moment exists without `b`: Linux's renameat2(RENAME_EXCHANGE),
    which Python's os module does not offer; elsewhere (or on file systems without it) two renames."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    aside = b.with_name(f".{b.name}.replaced-{os.getpid()}")
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


def csv_text(rows: list[dict], fields: list[str]) -> str:
    """`rows` as CSV text with a header of `fields` (missing cells empty), formula-like cells neutralised."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def spreadsheet_safe(value: object) -> object:
    """A text cell that Excel, LibreOffice or Google Sheets would run as a formula, quoted with a
    leading apostrophe; numbers and other text unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value
