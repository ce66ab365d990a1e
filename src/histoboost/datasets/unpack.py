"""Unpacking a downloaded archive (zip or tar) under the rules bundles are read by: no member may land outside the
folder, no links or devices, at most so many members and bytes, no member that inflates beyond belief, and room
for it all on the disk. A refused archive leaves nothing behind."""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..errors import DatasetError

MAX_MEMBERS = 200_000  # BreakHis holds about 8,000 files, BACH about 900
MAX_TOTAL_BYTES = 128 * 2**30
MAX_RATIO = 50  # uncompressed / compressed, for members over 1 MiB and the whole archive (as container.MAX_RATIO)
FREE_MARGIN = 2**30  # unpacking never leaves the disk with less than this free
COPY_CHUNK = 1 << 20


def unpack(archive: Path, into: Path) -> None:
    """Extract `archive` (.zip, .tar, .tar.gz, .tgz) into the folder `into`, refusing a hostile one in one line."""
    try:
        if zipfile.is_zipfile(archive):
            _unzip(archive, into)
        elif tarfile.is_tarfile(archive):
            _untar(archive, into)
        else:
            raise DatasetError(f"{archive}: neither a zip nor a tar archive: delete it and fetch again")
    except OSError as err:  # a name both a file and a folder, a full disk: the staged folder is removed by fetch
        raise DatasetError(f"{archive}: cannot be unpacked ({err.strerror or err}): nothing was kept") from None


def _unzip(archive: Path, into: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_count(archive, len(infos))
            for info in infos:
                _check_name(archive, info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise DatasetError(f"{archive}: {info.filename} is a link or a device: refused, nothing unpacked")
                if info.flag_bits & 0x1:
                    raise DatasetError(f"{archive}: {info.filename} is encrypted: not the owners' archive")
                if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(1, info.compress_size):
                    raise DatasetError(
                        f"{archive}: {info.filename} inflates {info.file_size // max(1, info.compress_size)}-fold: "
                        "refused as a zip bomb, nothing unpacked"
                    )
            _check_total(archive, into, sum(i.file_size for i in infos))
            for info in infos:
                target = into / info.filename
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(target, "wb") as out:
                    copied = _copy_at_most(source, out, info.file_size)
                if copied != info.file_size:
                    raise DatasetError(f"{archive}: {info.filename} is not the size its header states: damaged")
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DatasetError(f"{archive}: damaged zip ({err}): delete it and fetch again") from None


def _untar(archive: Path, into: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            members: list[tarfile.TarInfo] = []
            while (member := tf.next()) is not None:  # counted as read: a million empty members stop at the limit
                members.append(member)
                _check_count(archive, len(members))
                _check_name(archive, member.name)
                if not (member.isfile() or member.isdir()):
                    raise DatasetError(f"{archive}: {member.name} is a link or a device: refused, nothing unpacked")
            _check_total(archive, into, sum(m.size for m in members))
            # tarfile's own "data" filter too where this Python has it (3.11.4+): a second guard
            if hasattr(tarfile, "data_filter"):
                tf.extractall(into, members, filter="data")
            else:
                tf.extractall(into, members)
    except (tarfile.TarError, zlib.error, EOFError) as err:
        raise DatasetError(f"{archive}: damaged tar archive ({err}): delete it and fetch again") from None


def _check_count(archive: Path, n: int) -> None:
    if n > MAX_MEMBERS:
        raise DatasetError(f"{archive}: {n} members, more than the {MAX_MEMBERS} a data set here has: refused")


def _check_name(archive: Path, name: str) -> None:
    """A member's name must stay inside the folder: relative, no `..`, no backslashes or drive letters."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or ":" in name or not name.strip("/"):
        raise DatasetError(f"{archive}: member {name!r} would be written outside the folder: refused, nothing unpacked")


def _check_total(archive: Path, into: Path, total: int) -> None:
    """The whole archive's size unpacked: under the limit, not a bomb of small members, and with room to spare."""
    if total > 2**20 and total > MAX_RATIO * max(1, archive.stat().st_size):
        raise DatasetError(
            f"{archive}: inflates {total // max(1, archive.stat().st_size)}-fold in all: refused as a bomb, nothing "
            "unpacked"
        )
    if total > MAX_TOTAL_BYTES:
        raise DatasetError(
            f"{archive}: {total / 2**30:.1f} GiB unpacked, over the {MAX_TOTAL_BYTES / 2**30:.0f} GiB limit: refused"
        )
    free = shutil.disk_usage(into).free
    if total + FREE_MARGIN > free:
        raise DatasetError(
            f"{archive}: needs {total / 2**30:.1f} GiB to unpack, {free / 2**30:.1f} GiB are free: make room or "
            "fetch --to another disk"
        )


def _copy_at_most(source, out, size: int) -> int:
    """Copy at most `size` + 1 bytes (one more shows a member larger than its header says)."""
    copied = 0
    while copied <= size and (block := source.read(min(COPY_CHUNK, size + 1 - copied))):
        out.write(block)
        copied += len(block)
    return copied
