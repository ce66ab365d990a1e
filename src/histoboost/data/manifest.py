"""The validated data set: one `ImageRecord` per usable image, in a `Manifest`."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DataError
from ..outputs import spreadsheet_safe
from ..storage import write_text_atomic
from .labels import GROUP_NAMES
from .problems import Problem

Layout = Literal["csv", "bach", "breakhis", "class_folders"]


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image. No pixels: those are read on demand with `read_image`."""

    image_id: str  # content key: sha256 of the decoded pixels (`content_key`)
    name: str  # readable name: path relative to the data root, without suffix
    path: Path
    label: str  # the data set's own label
    group: int  # diagnostic group: 0 normal/benign, 1 in-situ, 2 invasive
    patient: str | None
    width: int
    height: int
    mode: str
    mpp: float | None  # µm per pixel stated by the file, when plausible
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def group_name(self) -> str:
        return GROUP_NAMES[self.group]


@dataclass(frozen=True)
class Manifest:
    """The validated images of a data set, in a stable order (by readable name)."""

    records: tuple[ImageRecord, ...]
    root: Path
    layout: Layout
    problems: tuple[Problem, ...] = ()  # warnings found while loading (converted, skipped), for the Python API

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def groups(self) -> np.ndarray:
        return np.array([r.group for r in self.records], dtype=np.int64)

    @property
    def has_patients(self) -> bool:
        return any(r.patient for r in self.records)

    def column(self, name: str) -> list[str | None]:
        """Values of a record attribute or extra column, e.g. for grouping folds by `id_block`."""
        if name == "image":
            return [r.image_id for r in self.records]
        if name in ("patient", "label", "name"):
            return [getattr(r, name) for r in self.records]
        if all(name in r.extra for r in self.records):
            return [r.extra[name] or None for r in self.records]
        extras = sorted({k for r in self.records for k in r.extra})
        raise DataError(
            f"the manifest has no column {name!r}: use image, patient, label or one of {', '.join(extras) or '(none)'}"
        )

    def summary(self) -> dict:
        """Counts per label and group, patients, sizes and resolutions, for `inspect` and reports."""
        patients = {r.patient for r in self.records if r.patient}
        return {
            "root": str(self.root),
            "layout": self.layout,
            "images": len(self.records),
            "per_label": dict(sorted(Counter(r.label for r in self.records).items())),
            "per_group": {GROUP_NAMES[g]: int(n) for g, n in sorted(Counter(r.group for r in self.records).items())},
            "patients": len(patients),
            "images_without_patient": sum(1 for r in self.records if not r.patient),
            "sizes": {f"{w}x{h}": n for (w, h), n in Counter((r.width, r.height) for r in self.records).most_common()},
            "mpp": dict(Counter(f"{r.mpp:.3g}" if r.mpp else "unknown" for r in self.records).most_common()),
        }

    def to_csv(self, path: str | Path) -> None:
        """Write the manifest as CSV (atomically, UTF-8, formula-like cells quoted), the extra columns included."""
        fixed = ["image_id", "name", "path", "label", "group", "patient", "width", "height", "mpp"]
        extras = sorted({k for r in self.records for k in r.extra} - set(fixed))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*fixed, *extras])
        for r in self.records:  # mpp: the file's, else the one the manifest stated
            writer.writerow(
                map(
                    spreadsheet_safe,
                    [
                        r.image_id,
                        r.name,
                        str(r.path),
                        r.label,
                        r.group,
                        r.patient or "",
                        r.width,
                        r.height,
                        r.extra.get("mpp", "") if r.mpp is None else f"{r.mpp:.6g}",
                        *(r.extra.get(k, "") for k in extras),
                    ],
                )
            )
        write_text_atomic(path, buffer.getvalue())
