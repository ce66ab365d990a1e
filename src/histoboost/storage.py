"""Files that many processes on many machines write at once: the feature store, slide tile caches, run outputs.

A local (or NFS/Lustre) file is written to a temporary file in the same folder, flushed to disk and renamed over
its final name, so a reader never sees half a file. The temporary's name carries its writer (host, process id,
a random id), so two machines never share one. A writer that works on a folder holds a *lease* there, a small
file it touches every few seconds; abandoned temporaries are then cleared by age on the file server's own clock
and by lease, never by a process id looked up on the wrong machine. An fsspec URL (`s3://`, `gs://`,
`memory://`; `file://` is a local path) gets one put per file instead: object stores publish an object only when
its upload completes, and have no rename to make atomic.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import threading
import uuid
from pathlib import Path
from typing import TypeGuard

from .errors import StorageError

HOSTNAME_ENV = "HISTOBOOST_HOSTNAME"  # overrides the machine name (tests simulate two machines with it)
LEASE_REFRESH_SECONDS = 10.0  # a lease holder touches its lease this often
LEASE_FRESH_SECONDS = 120.0  # a lease untouched for longer is a dead writer's
ABANDONED_AFTER_SECONDS = 3600.0  # a temporary this old with no fresh lease of its writer is removed
_TEMP_SUFFIX = ".tmp"
_LEASE_PREFIX = ".lease."
_PROCESS_ID = uuid.uuid4().hex[:8]  # tells this process apart from an earlier one with the same pid

Location = Path | str  # a local folder, or an fsspec URL string


def host() -> str:
    """This machine's name as it can appear inside a file name ($HISTOBOOST_HOSTNAME, else the node name)."""
    name = os.environ.get(HOSTNAME_ENV) or platform.node()
    return "".join(c for c in name if c.isalnum() or c in "-_")[:40] or "localhost"


def writer_id() -> str:
    """Who writes: `host.pid.random`, unique across machines and across reuse of a process id."""
    return f"{host()}.{os.getpid()}.{_PROCESS_ID}"


def is_url(location: Location) -> TypeGuard[str]:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def location(text: str | Path) -> Location:
    """A folder given by the user: a Path, or an fsspec URL kept as text (`file://` becomes a Path)."""
    text = str(text)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    return text if "://" in text else Path(text)


def local_folder(place: Location, purpose: str) -> Path:
    """`place` as a local (or mounted) folder; a URL is refused in one line, since `purpose` needs a file system."""
    if is_url(place):
        raise StorageError(
            f"{place}: {purpose} need a folder, not a URL: give --cache-dir (or $HISTOBOOST_CACHE) as a folder"
        )
    return Path(place)


def join(base: Location, *names: str) -> Location:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def name_of(target: Location) -> str:
    return str(target).rstrip("/").rsplit("/", 1)[-1] if is_url(target) else Path(target).name


def _fs(url: str):
    """fsspec's file system for `url`; one line when its protocol is unknown or its package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StorageError(
            f"{url}: cannot open this URL ({reason}): install the fsspec package for its protocol "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://) or give a folder"
        ) from None


def make_folder(folder: Location) -> None:
    if is_url(folder):
        fs, path = _fs(folder)
        fs.makedirs(path, exist_ok=True)
    else:
        Path(folder).mkdir(parents=True, exist_ok=True)


def read_bytes(target: Location) -> bytes | None:
    """The file's bytes, or None when there is no such file."""
    try:
        if is_url(target):
            fs, path = _fs(target)
            return fs.cat_file(path)
        return Path(target).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def exists(target: Location) -> bool:
    if is_url(target):
        fs, path = _fs(target)
        return fs.isfile(path)
    return Path(target).is_file()


def write_bytes(target: Location, data: bytes) -> None:
    """Publish `data` under `target` all at once: temporary + fsync + rename locally, one put for a URL.
    On failure nothing is left behind and the error names `target`."""
    if is_url(target):
        fs, path = _fs(target)
        fs.pipe_file(path, data)
        return
    target = Path(target)
    tmp = temporary_for(target)
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        _commit(tmp, target)
    except OSError as err:  # named after the file the user asked for, not the temporary one
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(target)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file all at once (`write_bytes`: temporary, fsync, rename), so readers never see half a
    file. File names that are not UTF-8 (surrogate escapes) are written as their original bytes."""
    write_bytes(Path(path), text.encode("utf-8", errors="surrogateescape"))


def write_npz(target: Location, arrays: dict, compressed: bool = False) -> None:
    """numpy arrays as one .npz, published at once (`write_bytes`)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    write_bytes(target, buffer.getvalue())


def temporary_for(target: Path) -> Path:
    """`.NAME.HOST.PID.RANDOM.tmp` beside `target` (a long NAME is shortened to a digest: the temporary's name must
    fit where the target's does)."""
    import hashlib

    name = target.name if len(target.name) <= 120 else hashlib.sha256(os.fsencode(target.name)).hexdigest()[:32]
    return target.with_name(f".{name}.{writer_id()}{_TEMP_SUFFIX}")


def _commit(tmp: Path, target: Path) -> None:
    """The rename that publishes a finished temporary (atomic within one file system)."""
    os.replace(tmp, target)


def _writer_of(tmp_name: str) -> str:
    """The writer id (host.pid.random) in a temporary's name; "" when it names none."""
    if not tmp_name.endswith(_TEMP_SUFFIX):
        return ""
    parts = tmp_name[: -len(_TEMP_SUFFIX)].rsplit(".", 3)  # .NAME (may hold dots) . HOST . PID . RANDOM
    return ".".join(parts[1:]) if len(parts) == 4 and parts[2].isdigit() else ""


class Lease:
    """`.lease.WRITER` in a folder, touched every LEASE_REFRESH_SECONDS by a daemon thread while held: tells
    other machines that this writer's temporaries there are in progress. A context manager; nested and concurrent
    holders in one process (a worker's threads, the client around its tasks) share one lease file, removed when the
    last lets go."""

    def __init__(self, folder: Location, refresh: float = LEASE_REFRESH_SECONDS):
        self.path = None if is_url(folder) else Path(folder).absolute() / f"{_LEASE_PREFIX}{writer_id()}"
        self.refresh = refresh

    def __enter__(self) -> Lease:
        if self.path is None:
            return self
        with _HELD_LOCK:
            if self.path in _HELD:
                _HELD[self.path][0] += 1
                return self
            try:
                self.path.touch()
            except OSError:  # a read-only folder: nothing is written there, so nothing to protect
                self.path = None
                return self
            stop = threading.Event()
            thread = threading.Thread(
                target=_keep, args=(self.path, stop, self.refresh), daemon=True, name="histoboost-lease"
            )
            thread.start()
            _HELD[self.path] = [1, stop, thread]
        return self

    def __exit__(self, *exc) -> None:
        if self.path is None:
            return
        with _HELD_LOCK:
            held = _HELD[self.path]
            held[0] -= 1
            if held[0]:
                return
            del _HELD[self.path]
        held[1].set()
        held[2].join()
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


_HELD: dict[Path, list] = {}  # lease file -> [holders, stop event, refreshing thread]
_HELD_LOCK = threading.Lock()


def _keep(path: Path, stop: threading.Event, refresh: float) -> None:
    """Touch (re-creating if another machine removed it) until stopped; a failed touch is tried again."""
    while not stop.wait(refresh):
        try:
            path.touch()
        except OSError:  # a passing NFS error, a full disk: the next touch may work
            pass


def server_now(folder: Path) -> float | None:
    """The file server's clock, read from the mtime of a file written there now (clocks of machines differ);
    None when the folder cannot be written."""
    probe = folder / f".clock.{writer_id()}"
    try:
        probe.touch()
        now = probe.stat().st_mtime
        probe.unlink()
        return now
    except OSError:
        return None


def live_leases(folder: Path, now: float) -> set[str]:
    """Writer ids with a lease in `folder` touched within LEASE_FRESH_SECONDS of `now` (the server's clock),
    except writers on this machine whose process is dead."""
    fresh = set()
    for lease in folder.glob(f"{_LEASE_PREFIX}*"):
        writer = lease.name[len(_LEASE_PREFIX) :]
        try:
            if now - lease.stat().st_mtime <= LEASE_FRESH_SECONDS and not _dead_here(writer):
                fresh.add(writer)
        except FileNotFoundError:
            pass
    return fresh


def _dead_here(writer: str) -> bool:
    """Whether `writer` (host.pid.random) ran on this machine and its process is gone."""
    parts = writer.split(".")
    return len(parts) == 3 and parts[0] == host() and parts[1].isdigit() and not process_alive(int(parts[1]))


def foreign_lease(folder: Path) -> bool:
    """Whether another writer (any other process, here or on another machine) holds a fresh lease in `folder`."""
    now = server_now(folder) if folder.is_dir() else None
    return now is not None and bool(live_leases(folder, now) - {writer_id()})


def clear_abandoned(
    folder: Location, abandoned_after: float = ABANDONED_AFTER_SECONDS, pattern: str | None = None
) -> list[str]:
    """Remove temporaries (files, or folders such as staged run folders) whose writer is gone, and stale leases. A
    temporary is abandoned when its writer ran on this machine and its process is dead, or when its writer holds
    no fresh lease and it is older than `abandoned_after` on the file server's clock. `pattern`: only the
    temporaries matching this glob (default: every one). Returns the names removed (none for URLs or read-only
    folders)."""
    if is_url(folder) or not Path(folder).is_dir():
        return []
    folder = Path(folder)
    now = server_now(folder)
    if now is None:
        return []
    leases = live_leases(folder, now)
    removed = []
    # `.*.tmp.npz`: temporaries named before writers were (histoboost < 0.6): removed by age alone
    for tmp in folder.glob(pattern) if pattern else [*folder.glob(f".*{_TEMP_SUFFIX}"), *folder.glob(".*.tmp.npz")]:
        writer = _writer_of(tmp.name)
        if writer == writer_id() or (pattern and not writer):  # a pattern's match without a writer is not ours
            continue
        try:
            age = now - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        if ((writer and _dead_here(writer)) or (writer not in leases and age > abandoned_after)) and _remove(tmp):
            removed.append(tmp.name)
    for lease in folder.glob(f"{_LEASE_PREFIX}*"):
        if lease.name[len(_LEASE_PREFIX) :] not in leases:
            _remove(lease)
    return removed


def _remove(path: Path) -> bool:
    """Unlink (a folder: remove its tree); False where that is not allowed (another user's file in a shared
    folder): left, not an error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def strict_json(data: str | bytes):
    """JSON without NaN or Infinity (a browser's and most tools' JSON cannot read them): a ValueError names it.
    Deep nesting still raises RecursionError; check `json_depth` of the result against the caller's bound."""
    return json.loads(data, parse_constant=_no_constant)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def json_depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, without recursion; stops counting once it passes `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend(
            (child, level + 1)
            for child in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
        )
    return deepest
