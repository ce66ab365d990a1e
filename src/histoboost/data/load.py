"""`load_manifest`: discover a data set, read each image once and validate it, reporting every problem at once."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from ..config import PreprocessConfig
from ..errors import DataError
from ..progress import Progress
from .images import scan_files, working_scale
from .labels import _group_of
from .layouts import MANIFEST_NAME, discover
from .manifest import ImageRecord, Manifest
from .problems import Problem, _Problems

_CONVERTED_MODES = {
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "1": "black and white",
    "P": "palette",
    "RGBA": "RGBA",
    "CMYK": "CMYK",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "I": "32-bit grayscale (read as 16-bit)",
    "F": "floating-point",
    "PA": "palette with alpha",
    "RGBX": "RGBX",
}


def load_manifest(
    source: str | Path,
    preprocess: PreprocessConfig | None = None,
    crop_size: int | None = None,
    label_map: Mapping[str, int] | None = None,
    threads: int | None = None,
    progress: Progress = False,
) -> tuple[Manifest, list[Problem]]:
    """Discover, read and validate every image under `source`.

    One pass that reads no image checks paths, labels and files listed twice; its errors stop there, before
    any image is decoded. Then each distinct file is decoded once, in parallel. Returns the manifest of usable
    images and the problems found (warnings included); raises `DataError` listing every error at once.
    Past `_PRINTED` problems only the first `_SHOWN` of each kind are returned, and a last one names the file
    that lists them all (beside the CSV manifest, else a temporary file): the only file written.
    `crop_size` with `preprocess` checks that each image holds a crop at the working resolution.
    """
    with _Problems(_problems_file(Path(source))) as problems:
        root, layout, entries = discover(source, label_map, problems)
        if problems.errors:
            raise problems.failure(f"{problems.errors:,} unusable file(s) under {root}")
        infos = scan_files([e.path for e in entries], threads, progress)
        records: list[ImageRecord] = []
        for entry in entries:
            info = infos[entry.path]
            if isinstance(info, Problem):
                problems.append(info)
                continue
            if info.mode != "RGB":
                kind = _CONVERTED_MODES.get(info.mode, info.mode)
                problems.append(
                    Problem(entry.path, f"{kind} image, converted to RGB", "expected an RGB H&E image", "warning")
                )
            if preprocess is not None and crop_size is not None:
                scale = working_scale(info.mpp, preprocess)
                w, h = round(info.width * scale), round(info.height * scale)
                if min(w, h) < crop_size:
                    problems.append(
                        Problem(
                            entry.path,
                            f"too small: {info.width}x{info.height} px is {w}x{h} at working scale {scale:.3g}, "
                            f"smaller than the {crop_size} px crop",
                            "remove it, or use a smaller --crop-size or a larger --scale",
                        )
                    )
                    continue
            group = entry.group if entry.group is not None else _group_of(entry.label, label_map)
            records.append(
                ImageRecord(
                    image_id=info.image_id,
                    name=_display_name(entry.path, root),
                    path=entry.path,
                    label=entry.label,
                    group=group,
                    patient=entry.patient,
                    width=info.width,
                    height=info.height,
                    mode=info.mode,
                    mpp=info.mpp,
                    extra=dict(entry.extra),
                )
            )
        records, duplicate_problems = _resolve_duplicates(records)
        problems.extend(duplicate_problems)
        if problems.errors:
            raise problems.failure(f"{problems.errors:,} unusable file(s) under {root}")
        if not records:
            raise DataError(
                f"no images found under {root}: expected one sub-folder per class, a {MANIFEST_NAME}, "
                "the BACH or the BreakHis layout"
            )
        records.sort(key=lambda r: r.name)
        return Manifest(tuple(records), root, layout), problems.finish()


def _problems_file(source: Path) -> Path:
    """Where the full list of a data set's problems goes when they are too many to print: beside its CSV
    manifest (`m.csv.problems.txt`), or in its folder."""
    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        source = source / MANIFEST_NAME
    return source.with_name(f"{source.name}.problems.txt") if source.is_file() else source / "histoboost-problems.txt"


def _resolve_duplicates(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[Problem]]:
    """Pixel-identical images under different groups leak between training and test: an error. Identical
    images with the same group are kept once, with a warning."""
    by_id: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: str(r.path)):
        by_id[record.image_id].append(record)
    kept, problems = [], []
    for copies in by_id.values():
        first = copies[0]
        if len({c.group for c in copies}) > 1:
            for c in copies:
                others = ", ".join(f"{o.path} ({o.label})" for o in copies if o is not c)
                problems.append(
                    Problem(
                        c.path,
                        f"identical to {others} under another label: the same image in training and test would leak",
                        "keep one copy with its correct label",
                    )
                )
            continue
        kept.append(first)
        for c in copies[1:]:
            problems.append(
                Problem(c.path, f"identical to {first.path}; counted once", "remove the duplicate", "warning")
            )
    return kept, problems


def _display_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        return path.stem
