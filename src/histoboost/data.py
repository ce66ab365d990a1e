"""Discovering, validating and loading labelled images: the manifest is the pipeline's input.

An image's id is a content key: the sha256 of its decoded RGB pixels (`content_key`), so results
survive renames, moves and metadata edits (EXIF, comments), and pixel-identical files are duplicates.
Supported layouts: a folder with one sub-folder per class, a CSV manifest
(`path,label[,group][,patient],...`), the BACH / ICIAR 2018 part A layout (with or without its
`microscopy_ground_truth.csv`) and BreakHis. Validation first checks paths, labels and repeated rows in
one streaming pass that reads no image, then decodes each distinct file once, in parallel, refuses images
that show no tissue (blank, black, one colour, noise), keeps no pixels, and reports every problem at once:
past a few dozen, the first few of each kind, and a file that lists them all.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import re
import stat
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import HistoboostError, PreprocessConfig
from .outputs import spreadsheet_safe

GROUP_NAMES = ("normal_benign", "in_situ", "invasive")
GROUPS = (0, 1, 2)  # the class -> group map of the 3-group scheme: each class its own group
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".svs", ".bmp"})
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("path", "label", "group", "patient")  # a manifest's own columns; any other is kept as extra
BACH_GROUND_TRUTH = "microscopy_ground_truth.csv"

# Dataset labels -> diagnostic group, compared after `_label_key` (lower case, letters and digits).
DEFAULT_LABEL_GROUPS: dict[str, int] = {
    "normal": 0, "benign": 0, "normalbenign": 0, "nonmalignant": 0,
    "insitu": 1, "insitucarcinoma": 1, "dcis": 1,
    "invasive": 2, "invasivecarcinoma": 2, "malignant": 2,
    "0": 0, "1": 1, "2": 2,
    # BreakHis tumour types (benign -> 0, malignant -> 2).
    "adenosis": 0, "fibroadenoma": 0, "phyllodestumor": 0, "tubularadenoma": 0,
    "ductalcarcinoma": 2, "lobularcarcinoma": 2, "mucinouscarcinoma": 2, "papillarycarcinoma": 2,
}

BREAKHIS_TYPES = {
    "A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma", "PC": "papillary_carcinoma",
}
# SOB_<B|M>_<type>-<year>-<patient>-<magnification>-<sequence>.png
BREAKHIS_NAME = re.compile(r"^SOB_(?P<cls>[BM])_(?P<type>[A-Z]+)-(?P<year>\d+)-(?P<patient>[^-]+)-(?P<mag>\d+)-(?P<seq>\d+)$")

# Plausible microscopy resolutions; anything else (e.g. a default 72 dpi) is treated as unknown.
_MPP_RANGE = (0.05, 20.0)
_CONVERTED_MODES = {"L": "grayscale", "LA": "grayscale with alpha", "1": "black and white", "P": "palette",
                    "RGBA": "RGBA", "CMYK": "CMYK", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale",
                    "I;16L": "16-bit grayscale", "I": "32-bit grayscale (read as 16-bit)",
                    "F": "floating-point", "PA": "palette with alpha", "RGBX": "RGBX"}

# The tissue check (`tissue_problem`). In brackets: the closest of the 268 BACH training images.
_TISSUE_SAMPLE = 256  # the check reads a subsample of about this many pixels along the longer side
_NEAR_BLACK = 40  # a pixel is near black when every channel is below this
_MAX_DARK_FRACTION = 0.5  # [2.5% of pixels near black]
_STAINED_MAX = 205  # a pixel is stained when a channel is at most this: optical density >= 0.15 (stain.OD_BETA)
_MIN_STAINED_FRACTION = 0.01  # as stain.MIN_TISSUE_FRACTION [37%; with 85% of its area fat, 1.8%]
_MIN_BRIGHTNESS_SPREAD = 2.0  # standard deviation of brightness, 0-255 [10.4]
_MIN_NEIGHBOUR_CORRELATION = 0.15  # of horizontally adjacent pixels [0.84; random noise is about 0]
_NO_TISSUE_FIX = "remove it: histoboost reads H&E images of tissue"
_IS_FOLDER = "is a folder"  # what `_file_status` says of a folder
_PRINTED = 50  # up to this many problems are all returned; past it, the first `_SHOWN` of each kind
_SHOWN = 5
_UNSEEN = object()  # a manifest path not looked at yet

Layout = Literal["csv", "bach", "breakhis", "class_folders"]


class DataError(HistoboostError):
    """The data cannot be used as given; `problems` lists every reason, one per file."""

    def __init__(self, message: str, problems: tuple[Problem, ...] = ()):
        super().__init__(message)
        self.problems = problems


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
        if self._file is None:
            self._open()
        self._file.write(f"{problem}\n")
        if self.counts[kind] <= _SHOWN:
            self.kept.append(problem)

    def extend(self, problems) -> None:
        for problem in problems:
            self.append(problem)

    def _open(self) -> None:
        """Start the file of every problem (beside the manifest, else a temporary file) with those kept so far,
        then keep only the first few of each kind."""
        from .storage import temporary_for

        try:
            self._tmp = temporary_for(self.path)
            self._file = open(self._tmp, "x", encoding="utf-8", errors="surrogateescape")
        except OSError:  # a read-only data folder
            handle, name = tempfile.mkstemp(prefix=f"{self.path.name.removesuffix('.txt')}.", suffix=".txt")
            self.path = self._tmp = Path(name)
            self._file = open(handle, "w", encoding="utf-8", errors="surrogateescape")
        shown: Counter[tuple[str, str]] = Counter()
        held, self.kept = self.kept, []
        for problem in held:
            self._file.write(f"{problem}\n")
            shown[problem.severity, problem.fix] += 1
            if shown[problem.severity, problem.fix] <= _SHOWN:
                self.kept.append(problem)

    def finish(self) -> list[Problem]:
        """The problems to show: all of them, or the first few of each kind and a last one naming the file."""
        if self._file is None:
            return self.kept
        self._file.close()
        os.replace(self._tmp, self.path)
        total, errors = sum(self.counts.values()), self.errors
        return [*self.kept, Problem(
            self.path, f"{total:,} problems ({errors:,} error(s), {total - errors:,} warning(s)), too many to print: "
            f"the first {_SHOWN} of each kind are shown", "this file lists them all", "error" if errors else "warning")]

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
            self._tmp.unlink(missing_ok=True)


def _problems_file(source: Path) -> Path:
    """Where the full list of a data set's problems goes when they are too many to print: beside its CSV
    manifest (`m.csv.problems.txt`), or in its folder."""
    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        source = source / MANIFEST_NAME
    return source.with_name(f"{source.name}.problems.txt") if source.is_file() else source / "histoboost-problems.txt"


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
            writer.writerow(map(spreadsheet_safe, [
                r.image_id, r.name, str(r.path), r.label, r.group, r.patient or "", r.width, r.height,
                r.extra.get("mpp", "") if r.mpp is None else f"{r.mpp:.6g}", *(r.extra.get(k, "") for k in extras)]))
        write_text_atomic(path, buffer.getvalue())


@dataclass(frozen=True)
class ClassScheme:
    """What the classifier tells apart: its classes, the data set's name of each and the diagnostic group each
    belongs to. Decisions are taken group first, then class within the group, so the 3-group answer derived
    from a class answer (probabilities summed per group) never disagrees with it."""

    name: str
    classes: tuple[str, ...]  # histoboost's names: the p_<class> and votes_<class> columns
    labels: tuple[str, ...]  # the data set's spelling of each class: predict's `label` column
    groups: tuple[int, ...]  # diagnostic group of each class
    label_keys: tuple[tuple[str, ...], ...] = ()  # labels (after `_label_key`) of each class; () = by group

    @property
    def is_groups(self) -> bool:
        """Whether the classes are the 3 diagnostic groups themselves."""
        return self.groups == GROUPS

    def targets(self, manifest: Manifest) -> np.ndarray:
        """The class index of each image (N,); `DataError` naming an image whose label is not one of the classes."""
        if not self.label_keys:
            return manifest.groups
        lookup = {key: c for c, keys in enumerate(self.label_keys) for key in keys}
        found = [lookup.get(_label_key(r.label)) for r in manifest]
        missing = [r for r, c in zip(manifest, found) if c is None]
        if missing:
            raise DataError(f"--classes {self.name} needs the labels {', '.join(self.labels)}: {len(missing)} image(s) "
                            f"have others, e.g. {missing[0].label!r} ({missing[0].path}); use --classes groups")
        return np.array(found, dtype=np.int64)


CLASS_SCHEMES = {
    "groups": ClassScheme("groups", GROUP_NAMES, GROUP_NAMES, GROUPS),
    # BACH / ICIAR 2018 part A's four classes, as the challenge and the published results score them.
    "bach4": ClassScheme("bach4", ("normal", "benign", "in_situ", "invasive"), ("Normal", "Benign", "InSitu", "Invasive"),
                         (0, 0, 1, 2), (("normal",), ("benign",), ("insitu", "insitucarcinoma", "dcis"),
                                        ("invasive", "invasivecarcinoma"))),
}


def class_scheme(name: str) -> ClassScheme:
    """The named class scheme (`groups` or `bach4`)."""
    if name not in CLASS_SCHEMES:
        raise DataError(f"unknown classes {name!r}: choose one of {', '.join(CLASS_SCHEMES)}")
    return CLASS_SCHEMES[name]


@dataclass(frozen=True, slots=True)
class _Entry:
    """A file found by layout discovery, before it has been read (one per distinct file: slots keep a
    million of them small)."""

    path: Path
    label: str
    group: int | None
    patient: str | None
    extra: Mapping[str, str]


@dataclass(frozen=True)
class _FileInfo:
    image_id: str  # content key of the decoded pixels
    width: int
    height: int
    mode: str
    mpp: float | None


def load_manifest(
    source: str | Path,
    preprocess: PreprocessConfig | None = None,
    crop_size: int | None = None,
    label_map: Mapping[str, int] | None = None,
    threads: int | None = None,
    progress: bool = False,
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
        infos = _scan_all([e.path for e in entries], threads, progress)
        records: list[ImageRecord] = []
        for entry in entries:
            info = infos[entry.path]
            if isinstance(info, Problem):
                problems.append(info)
                continue
            if info.mode != "RGB":
                kind = _CONVERTED_MODES.get(info.mode, info.mode)
                problems.append(Problem(entry.path, f"{kind} image, converted to RGB", "expected an RGB H&E image",
                                        "warning"))
            if preprocess is not None and crop_size is not None:
                scale = working_scale(info.mpp, preprocess)
                w, h = round(info.width * scale), round(info.height * scale)
                if min(w, h) < crop_size:
                    problems.append(Problem(
                        entry.path,
                        f"too small: {info.width}x{info.height} px is {w}x{h} at working scale {scale:.3g}, "
                        f"smaller than the {crop_size} px crop",
                        "remove it, or use a smaller --crop-size or a larger --scale",
                    ))
                    continue
            group = entry.group if entry.group is not None else _group_of(entry.label, label_map)
            records.append(ImageRecord(
                image_id=info.image_id, name=_display_name(entry.path, root), path=entry.path, label=entry.label,
                group=group, patient=entry.patient, width=info.width, height=info.height, mode=info.mode,
                mpp=info.mpp, extra=dict(entry.extra),
            ))
        records, duplicate_problems = _resolve_duplicates(records)
        problems.extend(duplicate_problems)
        if problems.errors:
            raise problems.failure(f"{problems.errors:,} unusable file(s) under {root}")
        if not records:
            raise DataError(f"no images found under {root}: expected one sub-folder per class, a {MANIFEST_NAME}, "
                            "the BACH or the BreakHis layout")
        records.sort(key=lambda r: r.name)
        return Manifest(tuple(records), root, layout), problems.finish()


def discover(source: str | Path, label_map: Mapping[str, int] | None, problems: _Problems | list[Problem]
             ) -> tuple[Path, Layout, list[_Entry]]:
    """Find the images and their labels under `source` (a folder or a CSV file), reading no image; what is
    wrong goes to `problems`."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder (give a data folder or a CSV manifest)")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: not a CSV manifest (give a data folder or a .csv file)")
        return source.parent, "csv", _from_csv(source, label_map, problems)
    if (source / MANIFEST_NAME).is_file():
        return source, "csv", _from_csv(source / MANIFEST_NAME, label_map, problems)
    ground_truth = next(iter(sorted(source.rglob(BACH_GROUND_TRUTH))), None)
    if ground_truth is not None:
        return source, "bach", _from_bach_ground_truth(ground_truth, label_map, problems)
    images, found_problems = find_images(source)
    if not images:
        raise DataError(f"{source}: no images found (expected .jpg, .png or .tif files in one sub-folder per class)",
                        tuple(found_problems))
    problems.extend(found_problems)
    if any(BREAKHIS_NAME.match(p.stem) for p in images):
        entries, layout_problems = _from_breakhis(images)
        problems.extend(layout_problems)
        return source, "breakhis", entries
    entries, layout_problems = _from_class_folders(source, images, label_map)
    problems.extend(layout_problems)
    layout: Layout = "bach" if {e.label for e in entries} <= {"Normal", "Benign", "InSitu", "Invasive"} else "class_folders"
    return source, layout, entries


def find_images(folder: Path) -> tuple[list[Path], list[Problem]]:
    """The image files under `folder` (linked folders followed once), and a warning for each name that
    looks like an image but is not a readable file (a folder, a broken link, a link loop): none is
    skipped silently."""
    images, problems, searched, pending = [], [], set(), [folder]
    while pending:
        directory = pending.pop()
        try:
            info = directory.stat()
            children = sorted(directory.iterdir())
        except OSError as err:
            problems.append(Problem(directory, f"folder cannot be read ({err.strerror or err}): left out",
                                    "check its permissions", "warning"))
            continue
        if (info.st_dev, info.st_ino) in searched:
            problems.append(Problem(directory, "links to a folder already searched: not followed",
                                    "remove the link", "warning"))
            continue
        searched.add((info.st_dev, info.st_ino))
        for child in children:
            status = _file_status(child)
            if status == _IS_FOLDER:
                pending.append(child)
            if child.suffix.lower() in IMAGE_SUFFIXES:
                if status is None:
                    images.append(child)
                else:
                    problems.append(Problem(child, f"named like an image but {status}: not read as an image",
                                            "rename, fix or remove it", "warning"))
    return sorted(images), problems


def working_scale(mpp: float | None, preprocess: PreprocessConfig) -> float:
    """The resize factor to the working resolution: from µm/px when both are known, else the scale."""
    if preprocess.target_mpp is not None and mpp is not None:
        return mpp / preprocess.target_mpp
    return preprocess.scale


def read_image(path: str | Path, scale: float = 1.0) -> np.ndarray:
    """Decode an image to an RGB uint8 array (H, W, 3), resized by `scale` with Lanczos filtering."""
    with Image.open(path) as image:
        image = _to_rgb(image)
        if scale != 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.uint8).copy()


def read_record(record: ImageRecord, preprocess: PreprocessConfig) -> np.ndarray:
    """The record's pixels at the working resolution."""
    return read_image(record.path, working_scale(record.mpp, preprocess))


def content_key(rgb: np.ndarray) -> str:
    """An image's id: sha256 of its size and RGB uint8 pixels, so metadata edits (EXIF, comments, PNG
    text) and renames keep it and any pixel change gives another."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"content_key needs an RGB uint8 array (H, W, 3), not {rgb.dtype} {rgb.shape}")
    digest = hashlib.sha256(b"histoboost-rgb8:%d:%d\n" % (rgb.shape[1], rgb.shape[0]))
    digest.update(np.ascontiguousarray(rgb))
    return digest.hexdigest()


def tissue_problem(rgb: np.ndarray) -> str | None:
    """Why an RGB uint8 image (H, W, 3) shows no tissue (black, blank, one colour, noise), or None.

    Independent of stain normalisation, and read on a subsample: a few milliseconds per image."""
    if rgb.size == 0:
        return "no pixels (a 0x0 image)"
    rgb = rgb if rgb.shape[1] > 1 else rgb.transpose(1, 0, 2)  # neighbours along the longer side
    step = max(1, -(-max(rgb.shape[:2]) // _TISSUE_SAMPLE))
    sample = rgb[::step, ::step]
    red, green, blue = sample[..., 0], sample[..., 1], sample[..., 2]
    dark = float((np.maximum(np.maximum(red, green), blue) < _NEAR_BLACK).mean())
    if dark > _MAX_DARK_FRACTION:
        return f"too dark: {dark:.0%} of pixels near black (an all-black or unexposed image)"
    stained = float((np.minimum(np.minimum(red, green), blue) <= _STAINED_MAX).mean())
    if stained < _MIN_STAINED_FRACTION:
        return f"no tissue: {stained:.1%} of pixels stained (an all-white or blank image)"
    spread = float(_brightness(sample).std())
    if spread < _MIN_BRIGHTNESS_SPREAD:
        return f"no tissue: one flat colour (brightness spread {spread:.1f} of 255)"
    r = _correlation(_brightness(rgb[::step, :-1:step]), _brightness(rgb[::step, 1::step]))
    if r < _MIN_NEIGHBOUR_CORRELATION:
        return f"looks like noise, not tissue: neighbouring pixels uncorrelated (r={r:.2f})"
    return None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file all at once (`storage.write_bytes`: temporary, fsync, rename), so readers never see
    half a file. File names that are not UTF-8 (surrogate escapes) are written as their original bytes."""
    from .storage import write_bytes

    write_bytes(Path(path), text.encode("utf-8", errors="surrogateescape"))


def parse_label_map(text: str) -> dict[str, int]:
    """Parse `Label=group,Label=group` (e.g. `Normal=0,Benign=0,InSitu=1,Invasive=2`)."""
    mapping: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, group = item.rpartition("=")
        if not sep or group.strip() not in ("0", "1", "2"):
            raise DataError(f"--label-map item {item!r} must look like Label=0, Label=1 or Label=2")
        mapping[label.strip()] = int(group)
    return mapping


# -- layouts -------------------------------------------------------------------------------------


def _from_csv(path: Path, label_map: Mapping[str, int] | None, problems: _Problems | list[Problem]) -> list[_Entry]:
    """A CSV manifest, read row by row: each distinct path is looked at once (one stat), a row that lists a
    file again is counted once, and what is kept per row is one small entry per distinct file."""
    base, name_of_csv, rows = path.parent, path.name, _csv_rows(path)
    header = next(rows, None)
    if header is None:
        raise DataError(f"{path}: empty file (a manifest needs the header path,label and one row per image)")
    columns = _manifest_columns(path, header[1])
    at = {c: i for i, c in enumerate(columns)}
    extra_columns = [(i, c) for i, c in enumerate(columns) if c and c not in MANIFEST_COLUMNS]
    entries, statuses, first_rows, groups = [], {}, {}, {}
    listed = 0
    for line, cells in rows:
        listed += 1
        where = f"on line {line} of {name_of_csv}"
        if any(cell.strip() for cell in cells[len(columns):]):
            problems.append(Problem(path, f"{len(cells)} fields {where}, but {len(columns)} columns in the header",
                                    "quote fields that contain commas"))
            continue
        cells += [""] * (len(columns) - len(cells))
        name, label = cells[at["path"]].strip(), cells[at["label"]].strip()
        group_text = cells[at["group"]].strip() if "group" in at else ""
        if not name:
            problems.append(Problem(path, f"empty path {where}", "fill in the image's path or remove the row"))
            continue
        first = first_rows.get(name)  # (line, group, path) of the first usable row listing it
        if first is None:
            file = Path(name) if os.path.isabs(name) else base / name
            status = statuses.get(name, _UNSEEN)
            if status is _UNSEEN:
                status = statuses[name] = _file_status(file)
        else:
            file, status = first[2], None
        if status is not None:
            problems.append(Problem(file, f"listed {where} but {status}", "fix the path or remove the row"))
            continue
        if not label:
            problems.append(_empty_label(file, where))
            continue
        if group_text and group_text not in ("0", "1", "2"):
            problems.append(Problem(file, f"group {group_text!r} {where} is not 0, 1 or 2",
                                    "use 0 normal/benign, 1 in-situ, 2 invasive"))
            continue
        group = int(group_text) if group_text else None
        if label not in groups:
            groups[label] = _maybe_group(label, label_map)
        known = groups[label]
        if group is None and known is None:
            problems.append(_unknown_label(file, label))
            continue
        if group is not None and known is not None and group != known:
            problems.append(Problem(
                file, f"label {label!r} means group {known} ({GROUP_NAMES[known]}) but the group column {where} "
                f"says {group} ({GROUP_NAMES[group]})",
                f"correct one of them, or pass --label-map '{label}={group}' if that label is group {group} here"))
            continue
        if first is not None:
            problems.append(_listed_again(file, where, first[0], first[1], known if group is None else group))
            continue
        first_rows[name] = (line, known if group is None else group, file)
        patient = cells[at["patient"]].strip() if "patient" in at else ""
        entries.append(_Entry(file, label, group, patient or None, {c: cells[i] for i, c in extra_columns}))
    if not listed:
        raise DataError(f"{path}: the CSV lists no images, only its header (add one row path,label per image)")
    return entries


def _listed_again(file: Path, where: str, first_line: int, first_group: int, group: int) -> Problem:
    """A row that lists a file listed before: counted once; under another group, the leak of one image into
    both training and test."""
    if group == first_group:
        return Problem(file, f"listed again {where} (first on line {first_line}): counted once",
                       "remove the repeated row", "warning")
    return Problem(file, f"listed again {where} as {GROUP_NAMES[group]}, on line {first_line} as "
                   f"{GROUP_NAMES[first_group]}: the same image in training and test would leak",
                   "keep one row with its correct label")


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """The non-blank rows of a UTF-8 CSV file with their line numbers, one at a time; an unreadable file is one
    DataError."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            try:
                for row in reader:
                    if any(cell.strip() for cell in row):
                        yield reader.line_num, row
            except csv.Error as err:
                raise DataError(f"{path}: not a readable CSV, line {reader.line_num}: {err} (save it as CSV)") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}; check its permissions)") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> DataError:
    """The first byte of a file that is not UTF-8, and its line."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return DataError(f"{path}: not UTF-8 text, byte 0x{data[err.start]:02x} on line {line} (save it as UTF-8)")
    return DataError(f"{path}: not UTF-8 text (save it as UTF-8)")


def _manifest_columns(path: Path, header: list[str]) -> list[str]:
    """A manifest header's column names, the manifest's own in lower case (`Path` is `path`); duplicated
    or missing columns are one DataError, which names a `;` or tab separator when it sees one."""
    columns = [c.strip().lower() if c.strip().lower() in MANIFEST_COLUMNS else c.strip() for c in header]
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: column {repeated[0]!r} appears more than once in the header (keep one)")
    missing = {"path", "label"} - set(columns)
    if missing:
        separator = next((s for s in ";\t|" if s in ",".join(header)), None)
        fix = (f"separate the columns with commas, not {separator!r}" if separator else
               "the first line must name the columns, at least path,label")
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} ({fix})")
    return columns


def _from_bach_ground_truth(path: Path, label_map: Mapping[str, int] | None,
                            problems: _Problems | list[Problem]) -> list[_Entry]:
    """BACH's `microscopy_ground_truth.csv`: rows `file,label` with no header. A file is its path relative
    to the CSV's folder (`Benign/b001.tif`) or a name found once below it; images it omits are reported."""
    base = path.parent
    images, found_problems = find_images(base)
    problems.extend(found_problems)
    by_name: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        by_name[image.name].append(image)
    entries, listed, first_rows = [], set(), {}
    for index, (line, cells) in enumerate(_csv_rows(path)):
        if index == 0 and cells[0].strip().lower() in ("path", "file", "filename"):
            continue
        where = f"on line {line} of {path.name}"
        name, label = cells[0].strip(), (cells[1].strip() if len(cells) > 1 else "")
        if not name:
            problems.append(Problem(path, f"empty file name {where}", "fill in the image's name or remove the row"))
            continue
        file, status = base / name, _file_status(base / name)
        matches = by_name.get(name, []) if status is not None and Path(name).name == name else []
        if len(matches) > 1:
            found = ", ".join(m.relative_to(base).as_posix() for m in matches)
            problems.append(Problem(file, f"listed {where} matches {len(matches)} files: {found}",
                                    f"list its path relative to the CSV's folder, e.g. {found.split(', ')[0]}"))
            listed.update(matches)
            continue
        if matches:
            file, status = matches[0], None
        if status is not None:
            problems.append(Problem(file, f"listed {where} but {status}", "restore the file or remove the row"))
            continue
        listed.add(file)
        group = _maybe_group(label, label_map) if label else None
        if not label:
            problems.append(_empty_label(file, where))
        elif group is None:
            problems.append(_unknown_label(file, label))
        elif file in first_rows:
            problems.append(_listed_again(file, where, *first_rows[file], group))
        else:
            first_rows[file] = (line, group)
            entries.append(_Entry(file, label, None, None, {}))
    problems.extend(Problem(image, f"not listed in {path.name}: left out", f"add it to {path.name} or move it away",
                            "warning") for image in images if image not in listed)
    return entries


def _from_breakhis(images: list[Path]) -> tuple[list[_Entry], list[Problem]]:
    """BreakHis file names carry class, tumour type, patient and magnification."""
    entries, problems = [], []
    for file in images:
        match = BREAKHIS_NAME.match(file.stem)
        if match is None or match["type"] not in BREAKHIS_TYPES:
            problems.append(Problem(file, "name does not follow BreakHis's SOB_<B|M>_<type>-<year>-<patient>-<mag>-<seq>",
                                    "rename it or move it out of the data folder"))
            continue
        entries.append(_Entry(
            file, BREAKHIS_TYPES[match["type"]], 0 if match["cls"] == "B" else 2,
            f"{match['year']}-{match['patient']}", {"magnification": f"{match['mag']}X"},
        ))
    return entries, problems


def _from_class_folders(root: Path, images: list[Path], label_map: Mapping[str, int] | None
                        ) -> tuple[list[_Entry], list[Problem]]:
    entries, problems = [], []
    for file in images:
        parts = file.relative_to(root).parts
        if len(parts) < 2:
            problems.append(Problem(file, "not inside a class sub-folder", "move it into a folder named after its class"))
            continue
        label = parts[0]
        if _maybe_group(label, label_map) is None:
            problems.append(_unknown_label(file, label))
            continue
        entries.append(_Entry(file, label, None, None, {}))
    return entries, problems


# -- reading files -------------------------------------------------------------------------------


def _scan_all(paths: list[Path], threads: int | None, progress: bool) -> dict[Path, _FileInfo | Problem]:
    """Read and fully decode each file once, in parallel (Pillow releases the GIL while decoding)."""
    from tqdm.auto import tqdm

    paths = list(dict.fromkeys(paths))  # a file listed under two spellings (`a.png`, `./a.png`) is read once
    workers = max(1, threads or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(scan_file, paths), total=len(paths), desc="reading images", unit="img",
                            disable=not progress, leave=False))
    return dict(zip(paths, results))


def scan_file(path: Path) -> _FileInfo | Problem:
    """Read and fully decode one file: its content key, size, mode and µm/px, or the problem with it."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return Problem(path, f"cannot be read ({err.strerror or err})", "check the file's permissions")
    if not data:
        return Problem(path, "empty file (0 bytes)", "re-export or remove it")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > Image.MAX_IMAGE_PIXELS:
                return Problem(path, f"too large ({width}x{height} = {width * height / 1e6:.0f} Mpx, over Pillow's "
                               f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx)",
                               "tile or downscale it first")
            image.load()
            mode, mpp = image.mode, stated_mpp(image)
            rgb = np.asarray(_to_rgb(image))
    except Image.DecompressionBombError:
        return Problem(path, "too large (over Pillow's decompression-bomb limit)", "tile or downscale it first")
    except UnidentifiedImageError:
        return Problem(path, "not an image Pillow can read", "convert it to PNG, JPEG or TIFF, or remove it")
    except Exception as err:  # Pillow's decoders fail on damaged files with many types (struct.error, IndexError, ...)
        reason = str(err).split("\n")[0] or type(err).__name__
        return Problem(path, f"cannot be decoded ({reason})", "re-export the image, or remove it")
    reason = tissue_problem(rgb)
    if reason is not None:
        return Problem(path, reason, _NO_TISSUE_FIX)
    return _FileInfo(content_key(rgb), width, height, mode, mpp)


def _to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, as every reader here decodes it: 16-bit grayscale (and `I`, read as 16-bit) is
    scaled to 8 bits, where Pillow's convert would clip it to white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _brightness(rgb: np.ndarray) -> np.ndarray:
    """Mean of the three channels, float32, flattened."""
    return (rgb[..., 0].astype(np.float32) + rgb[..., 1] + rgb[..., 2]).ravel() / 3


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long series; 1.0 where either does not vary."""
    spread = float(a.std() * b.std())
    if spread == 0:
        return 1.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / spread)


def stated_mpp(image: Image.Image) -> float | None:
    """µm per pixel from TIFF resolution tags, an Aperio description or the dpi, where plausible."""
    candidates: list[float] = []
    try:  # malformed resolution metadata means an unknown resolution, not an unreadable image
        tags = getattr(image, "tag_v2", None)
        if tags is not None:
            description = str(tags.get(270, ""))
            match = re.search(r"MPP\s*=\s*([0-9]*\.?[0-9]+)", description)
            if match:
                candidates.append(float(match.group(1)))
            x_res, unit = tags.get(282), tags.get(296, 2)
            if x_res:
                per_unit = float(x_res)
                um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit))
                if per_unit > 0 and um_per_unit:
                    candidates.append(um_per_unit / per_unit)
        dpi = image.info.get("dpi")
        if dpi and float(dpi[0]) > 0:
            candidates.append(25400.0 / float(dpi[0]))
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    return next((mpp for mpp in candidates if plausible_mpp(mpp)), None)


def plausible_mpp(value: float | str | None) -> float | None:
    """`value` as µm/px when it is a plausible microscopy resolution (0.05-20), else None (a default 72 dpi, junk)."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1] else None


# -- labels and duplicates -----------------------------------------------------------------------


def _label_key(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower())


def _maybe_group(label: str, label_map: Mapping[str, int] | None) -> int | None:
    if label_map:
        custom = {_label_key(k): v for k, v in label_map.items()}
        if _label_key(label) in custom:
            return custom[_label_key(label)]
    return DEFAULT_LABEL_GROUPS.get(_label_key(label))


def _group_of(label: str, label_map: Mapping[str, int] | None) -> int:
    group = _maybe_group(label, label_map)
    assert group is not None, "discovery keeps only labels with a group"
    return group


def _empty_label(file: Path, where: str) -> Problem:
    return Problem(file, f"empty label {where}", "fill in its class, e.g. Normal, Benign, InSitu or Invasive")


def _unknown_label(file: Path, label: str) -> Problem:
    return Problem(file, f"label {label!r} has no diagnostic group",
                   f"pass --label-map '{label}=0' (0 normal/benign, 1 in-situ, 2 invasive) or add a group column")


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
                problems.append(Problem(c.path, f"identical to {others} under another label: the same image in "
                                        "training and test would leak", "keep one copy with its correct label"))
            continue
        kept.append(first)
        for c in copies[1:]:
            problems.append(Problem(c.path, f"identical to {first.path}; counted once",
                                    "remove the duplicate", "warning"))
    return kept, problems


def _display_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        return path.stem


def _file_status(path: Path) -> str | None:
    """None for a regular file; else why not, e.g. `not found`, `is a folder`, `is a broken symbolic link`."""
    try:
        mode = path.stat().st_mode
    except ValueError:  # a NUL byte in the name
        return "not found"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if err.errno == errno.ENOENT and path.is_symlink():
            return f"is a broken symbolic link (to {os.readlink(path)})"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "not found"
        return f"cannot be opened ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return _IS_FOLDER
    return None if stat.S_ISREG(mode) else "is not a regular file"
