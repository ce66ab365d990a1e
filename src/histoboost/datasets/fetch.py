"""`fetch`: a catalogue data set downloaded, checked, unpacked and laid out as histoboost reads it, with its licence
and provenance beside it. Each step is safe to interrupt: the download resumes, the unpacking is staged and
renamed into place only when whole, and a finished fetch is never redone."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..data.layouts import discover
from ..data.problems import Problem
from ..errors import DatasetError
from ..outputs import csv_text, staged_folder
from ..progress import Progress
from ..storage import write_text_atomic
from ..version import __version__
from .catalogue import Source
from .download import download, verify
from .unpack import unpack

SOURCE_FILE = "SOURCE.json"
LICENCE_FILE = "LICENCE.txt"
MANIFEST_FILE = "manifest.csv"


@dataclass(frozen=True)
class Fetched:
    """Where a data set now lies, what its manifests hold, and whether this call did the work."""

    folder: Path
    manifests: dict[str, int]  # file name -> images
    sha256: str
    already: bool = False


def fetch(
    source: Source, to: Path, sha256: str | None = None, keep_archive: bool = False, progress: Progress = True
) -> Fetched:
    """Download `source` into `to`, check it (its published size and checksums, and `sha256` when the caller
    trusts one), unpack it into `to/<name>/` with a manifest, the licence and SOURCE.json; the archive is deleted
    once unpacked unless kept. A data set fetched before is left as it is."""
    target = to / source.name
    if (target / SOURCE_FILE).is_file():
        try:
            recorded = json.loads((target / SOURCE_FILE).read_text())
        except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
            raise DatasetError(
                f"{target / SOURCE_FILE} is damaged ({err}): move {target} away and fetch again"
            ) from None
        return Fetched(target, recorded.get("manifests", {}), recorded.get("sha256", ""), already=True)
    if target.exists():
        raise DatasetError(f"{target} exists but holds no finished fetch ({SOURCE_FILE}): move it away or give --to")
    to.mkdir(parents=True, exist_ok=True)
    archive = download(source.url, to / source.filename, source.size, progress)
    published = {**source.digests, **({"sha256": sha256.lower()} if sha256 else {})}
    digest = verify(archive, source.size, published, progress)
    with staged_folder(target) as staging:
        unpack(archive, staging)
        manifests = _write_manifests(source, staging)
        write_text_atomic(staging / LICENCE_FILE, licence_text(source))
        provenance = {
            "name": source.name,
            "url": source.url,
            "file": source.filename,
            "bytes": archive.stat().st_size,
            "published": published,
            "sha256": digest,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "histoboost": __version__,
            "manifests": manifests,
        }
        write_text_atomic(staging / SOURCE_FILE, json.dumps(provenance, indent=2) + "\n")
    if not keep_archive:
        archive.unlink()
    return Fetched(target, manifests, digest)


def licence_text(source: Source) -> str:
    """What LICENCE.txt says, and `fetch` prints first: the terms, the citation, and the notes on using it."""
    lines = [
        source.title,
        f"source:   {source.url}",
        f"licence:  {source.licence}",
        f"          {source.licence_url}",
        f"cite:     {source.citation}",
        *(f"note:     {note}" for note in source.notes),
    ]
    return "\n".join(lines) + "\n"


def _write_manifests(source: Source, root: Path) -> dict[str, int]:
    """manifest.csv (every image) and, where the source publishes a split, one manifest per part (train.csv,
    held_out.csv): paths relative to `root`, the labels histoboost reads, patient and grouping columns."""
    images = root / source.images_folder
    if not images.is_dir():
        raise DatasetError(f"{source.filename} holds no {source.images_folder}/: not the archive {source.name} names")
    problems: list[Problem] = []
    _, _, entries = discover(images, None, problems)
    errors = [p for p in problems if p.severity == "error"]
    if errors or not entries:
        raise DatasetError(f"{source.filename}: {errors[0] if errors else 'no images found'}", tuple(errors))
    grouped = all(e.group is not None for e in entries)  # BreakHis's tumour types name no group: the layout does
    rows = [
        {
            "path": e.path.relative_to(root).as_posix(),
            "label": e.label,
            **({"group": str(e.group)} if grouped else {}),
            "patient": e.patient or "",
            **e.extra,
            **(source.columns(e.path) if source.columns else {}),
        }
        for e in sorted(entries, key=lambda e: e.path)
    ]
    parts = {MANIFEST_FILE: rows}
    for value in sorted({row.get("split", "") for row in rows} - {""}):
        parts[f"{value}.csv"] = [row for row in rows if row.get("split") == value]
    for name, part in parts.items():  # written as every histoboost CSV is (formula-like cells quoted)
        write_text_atomic(root / name, csv_text(part, list(rows[0])))
    return {name: len(part) for name, part in parts.items()}
