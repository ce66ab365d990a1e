"""Resumable, checked downloads: the archive grows in `NAME.part` by HTTP range requests (an interrupted transfer
continues where it stopped), and becomes `NAME` only once its size and published checksums agree."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import DatasetError
from ..progress import Progress, meter

CHUNK = 1 << 20
TIMEOUT_S = (15, 120)  # connect, and between two reads: a stalled server is an error, not a hang


def download(url: str, dest: Path, size: int | None, progress: Progress = True) -> Path:
    """`dest`, downloaded from `url` unless already complete; a partial `dest.part` is continued. The size is checked
    when published; the checksums by `verify`, after."""
    import requests
    import urllib3

    if dest.is_file():
        return dest
    part = partial_path(dest)
    done = part.stat().st_size if part.is_file() else 0
    if size is not None and done > size:
        raise DatasetError(f"{part}: {done} bytes, more than the {size} published: delete it and fetch again")
    if size is None or done < size:
        # identity: the archive's own bytes, never a gzip transfer encoding that a range cannot resume
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={done}-"} if done else {})}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
                if not (response.status_code == 416 and _whole_at(response, done)):
                    _append(response, part, done, dest.name, progress)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:  # raw reads raise urllib3's
            got = part.stat().st_size if part.is_file() else 0
            raise DatasetError(
                f"{url}: the transfer stopped at {got} bytes ({type(err).__name__}): run the same command again "
                f"to resume from {part.name}"
            ) from None
    got = part.stat().st_size
    if size is not None and got != size:
        raise DatasetError(
            f"{part}: {got} of {size} bytes: the server ended the transfer early; run the same command again to resume"
        )
    os.replace(part, dest)
    return dest


def _append(response, part: Path, done: int, name: str, progress: Progress) -> None:
    """Write a response's body after the `done` bytes already in `part` (all of it, when the server ignored the
    range and sent the whole file)."""
    if response.status_code >= 400:
        raise DatasetError(
            f"{response.url}: the server answered {response.status_code} {response.reason}: try again later, or "
            f"download {name} by hand into {part.parent} and run the same command"
        )
    if response.status_code == 200:  # no range support, or nothing asked: from the start
        done = 0
    elif not response.headers.get("Content-Range", "").startswith(f"bytes {done}-"):
        raise DatasetError(
            f"{response.url}: the server resumed at another byte than {done} "
            f"({response.headers.get('Content-Range', 'no Content-Range')}): delete {part} and fetch again"
        )
    length = response.headers.get("Content-Length")
    total = done + int(length) if length and length.isdigit() else None
    with open(part, "r+b" if done else "wb") as out:
        out.seek(done)
        out.truncate()
        with meter(f"downloading {name}", total, "B", progress, initial=done) as bar:
            for chunk in response.raw.stream(CHUNK, decode_content=False):  # the bytes as sent, never decoded
                out.write(chunk)
                bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())


def _whole_at(response, done: int) -> bool:
    """A 416 (nothing at or after `done`) means the partial file is whole when the server's length is `done`."""
    found = response.headers.get("Content-Range", "")
    return found == f"bytes */{done}" or not found


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def verify(path: Path, size: int | None, digests: dict[str, str], progress: Progress = True) -> str:
    """Check `path` against its published size and checksums (hashlib names: md5, sha256); returns its sha256,
    recorded beside the data. A mismatch raises, and the file is kept for the user to look at or delete."""
    got = path.stat().st_size
    if size is not None and got != size:
        raise DatasetError(f"{path}: {got} bytes, but {size} are published: delete it and fetch again")
    hashes = {name: hashlib.new(name) for name in {"sha256", *digests}}
    bar = meter(f"checking {path.name}", got, "B", progress)
    with open(path, "rb") as file:
        while block := file.read(8 * CHUNK):
            for h in hashes.values():
                h.update(block)
            bar.update(len(block))
    bar.close()
    for name, wanted in digests.items():
        if hashes[name].hexdigest() != wanted.lower():
            raise DatasetError(
                f"{path}: {name} {hashes[name].hexdigest()}, but the published one is {wanted}: the file is damaged "
                "or not the owners'; delete it and fetch again"
            )
    return hashes["sha256"].hexdigest()
