"""Finding the images and labels of a folder or CSV, reading no image: a CSV manifest, BACH, BreakHis or
one sub-folder per class."""

from __future__ import annotations

import csv
import errno
import os
import re
import stat
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .labels import GROUP_NAMES, _maybe_group
from .manifest import Layout
from .problems import Problem, _Problems

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".svs", ".bmp"})
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("path", "label", "group", "patient")  # a manifest's own columns; any other is kept as extra
BACH_GROUND_TRUTH = "microscopy_ground_truth.csv"

BREAKHIS_TYPES = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
# SOB_<B|M>_<type>-<year>-<patient>-<magnification>-<sequence>.png
BREAKHIS_NAME = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<type>[A-Z]+)-(?P<year>\d+)-(?P<patient>[^-]+)-(?P<mag>\d+)-(?P<seq>\d+)$"
)

_IS_FOLDER = "is a folder"  # what `_file_status` says of a folder
_UNSEEN = object()  # a manifest path not looked at yet


@dataclass(frozen=True, slots=True)
class _Entry:
    """A file found by layout discovery, before it has been read (one per distinct file: slots keep a
    million of them small)."""

    path: Path
    label: str
    group: int | None
    patient: str | None
    extra: Mapping[str, str]


def discover(
    source: str | Path, label_map: Mapping[str, int] | None, problems: _Problems | list[Problem]
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
        raise DataError(
            f"{source}: no images found (expected .jpg, .png or .tif files in one sub-folder per class)",
            tuple(found_problems),
        )
    problems.extend(found_problems)
    if any(BREAKHIS_NAME.match(p.stem) for p in images):
        entries, layout_problems = _from_breakhis(images)
        problems.extend(layout_problems)
        return source, "breakhis", entries
    entries, layout_problems = _from_class_folders(source, images, label_map)
    problems.extend(layout_problems)
    layout: Layout = (
        "bach" if {e.label for e in entries} <= {"Normal", "Benign", "InSitu", "Invasive"} else "class_folders"
    )
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
            problems.append(
                Problem(
                    directory,
                    f"folder cannot be read ({err.strerror or err}): left out",
                    "check its permissions",
                    "warning",
                )
            )
            continue
        if (info.st_dev, info.st_ino) in searched:
            problems.append(
                Problem(directory, "links to a folder already searched: not followed", "remove the link", "warning")
            )
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
                    problems.append(
                        Problem(
                            child,
                            f"named like an image but {status}: not read as an image",
                            "rename, fix or remove it",
                            "warning",
                        )
                    )
    return sorted(images), problems


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
    entries: list[_Entry] = []
    statuses: dict[str, str | None] = {}
    first_rows: dict[str, tuple[int, int, Path]] = {}  # name -> (line, group, path) of its first usable row
    groups: dict[str, int | None] = {}
    listed = 0
    for line, cells in rows:
        listed += 1
        where = f"on line {line} of {name_of_csv}"
        if any(cell.strip() for cell in cells[len(columns) :]):
            problems.append(
                Problem(
                    path,
                    f"{len(cells)} fields {where}, but {len(columns)} columns in the header",
                    "quote fields that contain commas",
                )
            )
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
            problems.append(
                Problem(
                    file, f"group {group_text!r} {where} is not 0, 1 or 2", "use 0 normal/benign, 1 in-situ, 2 invasive"
                )
            )
            continue
        group = int(group_text) if group_text else None
        if label not in groups:
            groups[label] = _maybe_group(label, label_map)
        known = groups[label]
        group_of_row = known if group is None else group
        if group_of_row is None:
            problems.append(_unknown_label(file, label))
            continue
        if group is not None and known is not None and group != known:
            problems.append(
                Problem(
                    file,
                    f"label {label!r} means group {known} ({GROUP_NAMES[known]}) but the group column {where} "
                    f"says {group} ({GROUP_NAMES[group]})",
                    f"correct one of them, or pass --label-map '{label}={group}' if that label is group {group} here",
                )
            )
            continue
        if first is not None:
            problems.append(_listed_again(file, where, first[0], first[1], group_of_row))
            continue
        first_rows[name] = (line, group_of_row, file)
        patient = cells[at["patient"]].strip() if "patient" in at else ""
        entries.append(_Entry(file, label, group, patient or None, {c: cells[i] for i, c in extra_columns}))
    if not listed:
        raise DataError(f"{path}: the CSV lists no images, only its header (add one row path,label per image)")
    return entries


def _listed_again(file: Path, where: str, first_line: int, first_group: int, group: int) -> Problem:
    """A row that lists a file listed before: counted once; under another group, the leak of one image into
    both training and test."""
    if group == first_group:
        return Problem(
            file,
            f"listed again {where} (first on line {first_line}): counted once",
            "remove the repeated row",
            "warning",
        )
    return Problem(
        file,
        f"listed again {where} as {GROUP_NAMES[group]}, on line {first_line} as "
        f"{GROUP_NAMES[first_group]}: the same image in training and test would leak",
        "keep one row with its correct label",
    )


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
        fix = (
            f"separate the columns with commas, not {separator!r}"
            if separator
            else "the first line must name the columns, at least path,label"
        )
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} ({fix})")
    return columns


def _from_bach_ground_truth(
    path: Path, label_map: Mapping[str, int] | None, problems: _Problems | list[Problem]
) -> list[_Entry]:
    """BACH's `microscopy_ground_truth.csv`: rows `file,label` with no header. A file is its path relative
    to the CSV's folder (`Benign/b001.tif`) or a name found once below it; images it omits are reported."""
    base = path.parent
    images, found_problems = find_images(base)
    problems.extend(found_problems)
    by_name: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        by_name[image.name].append(image)
    entries: list[_Entry] = []
    listed: set[Path] = set()
    first_rows: dict[Path, tuple[int, int]] = {}  # file -> (line, group) of its first row
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
            problems.append(
                Problem(
                    file,
                    f"listed {where} matches {len(matches)} files: {found}",
                    f"list its path relative to the CSV's folder, e.g. {found.split(', ')[0]}",
                )
            )
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
    problems.extend(
        Problem(image, f"not listed in {path.name}: left out", f"add it to {path.name} or move it away", "warning")
        for image in images
        if image not in listed
    )
    return entries


def _from_breakhis(images: list[Path]) -> tuple[list[_Entry], list[Problem]]:
    """BreakHis file names carry class, tumour type, patient and magnification."""
    entries, problems = [], []
    for file in images:
        match = BREAKHIS_NAME.match(file.stem)
        if match is None or match["type"] not in BREAKHIS_TYPES:
            problems.append(
                Problem(
                    file,
                    "name does not follow BreakHis's SOB_<B|M>_<type>-<year>-<patient>-<mag>-<seq>",
                    "rename it or move it out of the data folder",
                )
            )
            continue
        entries.append(
            _Entry(
                file,
                BREAKHIS_TYPES[match["type"]],
                0 if match["cls"] == "B" else 2,
                f"{match['year']}-{match['patient']}",
                {"magnification": f"{match['mag']}X"},
            )
        )
    return entries, problems


def _from_class_folders(
    root: Path, images: list[Path], label_map: Mapping[str, int] | None
) -> tuple[list[_Entry], list[Problem]]:
    entries, problems = [], []
    for file in images:
        parts = file.relative_to(root).parts
        if len(parts) < 2:
            problems.append(
                Problem(file, "not inside a class sub-folder", "move it into a folder named after its class")
            )
            continue
        label = parts[0]
        if _maybe_group(label, label_map) is None:
            problems.append(_unknown_label(file, label))
            continue
        entries.append(_Entry(file, label, None, None, {}))
    return entries, problems


def _empty_label(file: Path, where: str) -> Problem:
    return Problem(file, f"empty label {where}", "fill in its class, e.g. Normal, Benign, InSitu or Invasive")


def _unknown_label(file: Path, label: str) -> Problem:
    return Problem(
        file,
        f"label {label!r} has no diagnostic group",
        f"pass --label-map '{label}=0' (0 normal/benign, 1 in-situ, 2 invasive) or add a group column",
    )


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
