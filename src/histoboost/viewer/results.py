"""What the viewer was given: slide result folders (from `histoboost slide`) and image predictions (from
`histoboost predict`), found and checked once at start-up.

Result folders may be shared, so everything in them is untrusted: summary.json is checked against a schema of
the fields the viewer reads, tiles.csv and heatmap.npz against size, row and grid limits, and a result that
fails is refused at start in one line naming the file and the fix, never a 500 later. What may be served is
fixed here too: the files `histoboost slide` writes (slides) or the overlays the records name (predictions),
each resolved once inside its folder and pinned to its inode; a URL is only ever a key into that map.
"""

from __future__ import annotations

import csv
import math
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import ViewerError
from ..storage import json_depth, strict_json

MAX_JSON_BYTES = 64 * 2**20  # summary.json, a predictions JSON
MAX_JSON_DEPTH = 32  # levels, counting the values: summary.json has 6, a predictions JSON 3
MAX_TABLE_BYTES = 64 * 2**20  # tiles.csv, a predictions CSV
MAX_ROWS = 200_000  # tiles or records: the page's data.json is ~220 bytes a tile, so at most ~45 MB
MAX_NPZ_BYTES = 512 * 2**20  # heatmap.npz; only its small arrays are read, and only after their headers
MAX_GRID_CELLS = 2**22  # heat-map grid cells (one per tile position): 2048 x 2048; a 75 x 25 mm slide at 25 µm is 3M
SLIDE_AGAIN = "run histoboost slide again"
PREDICT_AGAIN = "run histoboost predict again"
FEWER_TILES = "run histoboost slide with a larger --stride-um (fewer tiles)"
FEWER_RECORDS = "run histoboost predict on fewer images at a time"

# The files `histoboost slide` writes in a result folder (slides/run.py), with the type each is served as;
# besides these only its GeoJSON (`files.geojson` in summary.json) and top/tile-NN.png, one per top tile.
SLIDE_FILES = {
    "summary.json": "application/json",
    "report.html": "text/html; charset=utf-8",
    "heatmap.png": "image/png",
    "mask.png": "image/png",
    "mask-outline.png": "image/png",
    "tiles.csv": "text/csv; charset=utf-8",
    "heatmap.npz": "application/octet-stream",
}
INLINE = {"image/png", "application/json", "text/html; charset=utf-8"}  # anything else is a download
OVERLAY = re.compile(r"[^/\\\x00]+\.overlay\.png")  # the names predict --overlay writes

# heatmap.npz's arrays the viewer reads: dtype kinds and shape ("grid" is the decision grid's shape).
GRID_ARRAYS = {
    "decision": ("i", "grid"),
    "p_carcinoma": ("f", "grid"),
    "start": ("iuf", (2,)),
    "tile_px": ("iuf", ()),
    "stride_px": ("iuf", ()),
}

_NUMBER = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 0}
_TEXT = {"type": "string"}
# The fields of summary.json the viewer reads (other fields are not looked at).
SUMMARY_SCHEMA = {
    "type": "object",
    "required": [
        "research_use_only",
        "slide",
        "bundle",
        "tissue",
        "tiles",
        "stain",
        "area_mm2",
        "carcinoma_regions",
        "call",
        "refer",
        "top_tiles",
        "files",
    ],
    "properties": {
        "research_use_only": _TEXT,
        "slide": {
            "type": "object",
            "required": ["path", "name", "fingerprint", "mpp", "size"],
            "properties": {
                "path": {"type": "string", "minLength": 1},
                "name": _TEXT,
                "fingerprint": {"type": "string", "minLength": 1},
                "mpp": {"type": "number", "exclusiveMinimum": 0},
                "size": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
            },
        },
        "bundle": {
            "type": "object",
            "required": ["sha256", "classes", "groups", "colors"],
            "properties": {
                "sha256": _TEXT,
                "classes": {
                    "type": "array",
                    "items": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
                    "minItems": 1,
                    "maxItems": 64,
                    "uniqueItems": True,
                },
                "groups": {"type": "array", "items": _COUNT},
                "colors": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "minItems": 3,
                        "maxItems": 3,
                        "items": {"type": "integer", "minimum": 0, "maximum": 255},
                    },
                },
            },
        },
        "tissue": {"type": "object", "required": ["area_mm2"], "properties": {"area_mm2": _NUMBER}},
        "tiles": {
            "type": "object",
            "required": ["scored", "confirmed"],
            "properties": {"scored": _COUNT, "confirmed": _COUNT},
        },
        "stain": _TEXT,
        "area_mm2": {"type": "object", "additionalProperties": _NUMBER},
        "carcinoma_regions": {
            "type": "object",
            "required": ["count", "largest_mm2", "regions"],
            "properties": {
                "count": _COUNT,
                "largest_mm2": _NUMBER,
                "regions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["class", "area_mm2", "bounds"],
                        "properties": {
                            "class": _TEXT,
                            "area_mm2": _NUMBER,
                            "bounds": {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 4},
                        },
                    },
                },
            },
        },
        "call": {"type": "object", "required": ["group", "rule"], "properties": {"group": _TEXT, "rule": _TEXT}},
        "refer": {"type": "array", "items": _TEXT},
        "top_tiles": {
            "type": "array",
            "maxItems": 99,
            "items": {
                "type": "object",
                "required": ["x", "y", "width", "height", "class", "p_carcinoma"],
                "properties": {
                    "x": _NUMBER,
                    "y": _NUMBER,
                    "width": _NUMBER,
                    "height": _NUMBER,
                    "class": _TEXT,
                    "p_carcinoma": _NUMBER,
                },
            },
        },
        "files": {
            "type": "object",
            "required": ["geojson"],
            "properties": {"geojson": {"type": "string", "pattern": r"^[^/\\\x00]+\.geojson\.gz$"}},
        },
    },
}


@dataclass(frozen=True)
class ServedFile:
    """A file the viewer may serve: its real path, the (device, inode) it had at start (a file swapped
    afterwards, by a link or a new file, is not served), its media type and whether it is a download."""

    path: Path
    identity: tuple[int, int]
    media_type: str
    attachment: bool


@dataclass
class SlideResult:
    """One slide's output folder: its summary, scored tiles (as the slide page reads them), grid, the files
    that may be served and the slide file it was made from."""

    name: str
    folder: Path
    summary: dict
    tiles: list[dict]
    grid: dict[str, np.ndarray]
    slide_path: Path
    files: dict[str, ServedFile] = field(default_factory=dict)


@dataclass
class ImageResults:
    """One `predict` output (CSV or JSON): its records and the overlays they name, found in its folder."""

    name: str
    folder: Path
    records: list[dict]
    overlays: dict[str, ServedFile] = field(default_factory=dict)  # overlay file name -> the file


def find_results(paths: list[str | Path]) -> tuple[list[SlideResult], list[ImageResults]]:
    """Slide result folders (a folder with summary.json, or an OUT folder of several), and predictions files
    (a predict CSV/JSON, or a folder holding them)."""
    slides: list[SlideResult] = []
    images: list[ImageResults] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ViewerError(f"{path}: no such file or folder")
        if path.is_dir() and (path / "summary.json").is_file():
            slides.append(load_slide_result(path))
        elif path.is_dir():
            found_slides = sorted(p.parent for p in path.glob("*/summary.json"))
            found_images = sorted(p for p in path.glob("*") if p.suffix in (".csv", ".json") and _is_predictions(p))
            if not found_slides and not found_images:
                raise ViewerError(
                    f"{path}: holds no slide result (summary.json) or predictions (a predict CSV/JSON): "
                    "give the folder `histoboost slide --out` or `predict --out` wrote"
                )
            slides.extend(load_slide_result(p) for p in found_slides)
            images.extend(load_predictions(p) for p in found_images)
        elif _is_predictions(path):
            images.append(load_predictions(path))
        else:
            raise ViewerError(f"{path}: not a slide result folder or a predict CSV/JSON")
    if not slides and not images:
        raise ViewerError("nothing to show: give slide result folders or predict outputs")
    return slides, images


def load_slide_result(folder: Path) -> SlideResult:
    """A slide result folder, checked whole: summary.json against SUMMARY_SCHEMA, heatmap.npz's grid, and every
    row of tiles.csv against both."""
    root = folder.resolve()
    files = _pinned(root, SLIDE_FILES)
    for name in ("summary.json", "heatmap.npz", "tiles.csv"):
        if name not in files:
            raise ViewerError(
                f"{folder / name}: missing, or not a file inside the folder (a link out of it?): not a "
                f"complete slide result; {SLIDE_AGAIN}"
            )
    summary = _read_json(files["summary.json"].path, SLIDE_AGAIN)
    _check_summary(summary, files["summary.json"].path)
    top = [f"top/tile-{rank:02d}.png" for rank in range(1, len(summary["top_tiles"]) + 1)]
    files |= _pinned(root, {summary["files"]["geojson"]: "application/gzip", **dict.fromkeys(top, "image/png")})
    classes = summary["bundle"]["classes"]
    grid = _read_grid(files["heatmap.npz"].path, len(classes))
    tiles = _read_tiles(files["tiles.csv"].path, classes, grid["decision"].shape)
    return SlideResult(folder.name, root, summary, tiles, grid, Path(summary["slide"]["path"]), files)


def load_predictions(path: Path) -> ImageResults:
    """A predict output file; each overlay its records name is looked up in its folder and the folders inside it."""
    records = (
        _read_json(path, PREDICT_AGAIN) if path.suffix == ".json" else _read_csv(path, PREDICT_AGAIN, FEWER_RECORDS)
    )
    if not isinstance(records, list):
        raise ViewerError(f"{path}: not a predict output (not a list of records): {PREDICT_AGAIN}")
    if len(records) > MAX_ROWS:
        raise ViewerError(f"{path}: more than {MAX_ROWS} records, the most the viewer shows: {FEWER_RECORDS}")
    records = [r for r in records if isinstance(r, dict)]
    folder = path.parent.resolve()
    wanted = {str(r.get("overlay")) for r in records if OVERLAY.fullmatch(str(r.get("overlay")))}
    found: dict[str, str] = {}  # overlay file name -> its path relative to the folder
    for candidate in [*folder.glob("*.overlay.png"), *sorted(folder.glob("*/*.overlay.png"))]:
        if candidate.name in wanted:
            found.setdefault(candidate.name, candidate.relative_to(folder).as_posix())
    pinned = _pinned(folder, dict.fromkeys(found.values(), "image/png"))
    overlays = {name: pinned[relative] for name, relative in found.items() if relative in pinned}
    return ImageResults(path.stem, folder, records, overlays)


def open_served(served: ServedFile):
    """The file opened for reading, or None when it is gone or is no longer the file found at start (replaced,
    or swapped for a link, a FIFO or a folder: opened without following a link and without waiting)."""
    try:
        handle = os.fdopen(os.open(served.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb")
    except OSError:
        return None
    info = os.fstat(handle.fileno())
    if (info.st_dev, info.st_ino) != served.identity or not stat.S_ISREG(info.st_mode):
        handle.close()
        return None
    return handle


def _pinned(root: Path, names: dict[str, str]) -> dict[str, ServedFile]:
    """Each named file that is a regular file inside `root` (after links), pinned to its inode."""
    found = {}
    for name, media_type in names.items():
        try:
            path = (root / name).resolve(strict=True)
            info = path.stat()
        except (OSError, RuntimeError):  # missing, a link loop, a name too long
            continue
        if path.is_relative_to(root) and stat.S_ISREG(info.st_mode):
            found[name] = ServedFile(path, (info.st_dev, info.st_ino), media_type, media_type not in INLINE)
    return found


def _check_summary(summary, path: Path) -> None:
    error = next(iter(_summary_validator().iter_errors(summary)), None)  # the first, without collecting them all
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "the top level"
        raise ViewerError(f"{path}: not a histoboost slide summary at {where} ({error.message[:160]}): {SLIDE_AGAIN}")
    bundle = summary["bundle"]
    if not len(bundle["classes"]) == len(bundle["groups"]) == len(bundle["colors"]):
        raise ViewerError(f"{path}: bundle classes, groups and colors differ in number: {SLIDE_AGAIN}")


@cache
def _summary_validator():
    import jsonschema

    return jsonschema.Draft202012Validator(SUMMARY_SCHEMA)


def _read_grid(path: Path, n_classes: int) -> dict[str, np.ndarray]:
    """heatmap.npz's arrays that the viewer reads: each header checked (dtype, shape, the grid's size) before
    its data is read, so a damaged or hostile archive costs no more memory than a real grid."""
    why = _grid_problem(path)
    if why is None:
        try:
            with np.load(path, allow_pickle=False) as data:
                grid = {key: data[key] for key in GRID_ARRAYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # truncated data, a bad CRC
            raise ViewerError(
                f"{path}: not a heat-map grid histoboost slide writes (a damaged archive): {SLIDE_AGAIN}"
            ) from None
        if grid["decision"].min() < -1 or grid["decision"].max() >= n_classes:
            why = f"decision holds classes outside -1..{n_classes - 1}"
        elif (
            not all(np.isfinite(grid[k]).all() for k in ("start", "tile_px", "stride_px"))
            or min(grid["tile_px"], grid["stride_px"]) <= 0
        ):
            why = "its start, tile_px and stride_px are not finite, positive numbers"
    if why is not None:
        raise ViewerError(f"{path}: not a heat-map grid histoboost slide writes ({why}): {SLIDE_AGAIN}")
    grid["decision"] = grid["decision"].astype(np.int16)
    grid["p_carcinoma"] = grid["p_carcinoma"].astype(np.float32, copy=False)
    return grid


def _grid_problem(path: Path) -> str | None:
    """Why heatmap.npz cannot be read as a grid, from its size and array headers alone; None when it can.
    Never numpy's own message (for an archive of pickles it advises loading it unsafely)."""
    size = path.stat().st_size
    if size > MAX_NPZ_BYTES:
        return f"{size / 2**20:.0f} MiB, over the {MAX_NPZ_BYTES // 2**20} MiB limit"
    if not zipfile.is_zipfile(path):
        return "not a numpy archive"
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for key in GRID_ARRAYS:
                if f"{key}.npy" not in archive.namelist():
                    return f"no {key} array"
                with archive.open(f"{key}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    if version not in read:
                        return f"{key} is in npy format {version}, which histoboost does not write"
                    shape, _, dtype = read[version](member)
                headers[key] = shape, dtype
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return "a damaged archive"
    grid = headers["decision"][0]
    for key, (kinds, want) in GRID_ARRAYS.items():
        shape, dtype = headers[key]
        if dtype.kind not in kinds or dtype.hasobject or shape != (grid if want == "grid" else want):
            return f"{key} is {dtype} of shape {shape}"
    if len(grid) != 2 or not 0 < grid[0] * grid[1] <= MAX_GRID_CELLS:
        return f"a grid of shape {grid}; the viewer shows 2-D grids of 1 to {MAX_GRID_CELLS} cells"
    return None


def _read_tiles(path: Path, classes: list[str], shape: tuple[int, int]) -> list[dict]:
    """tiles.csv's rows as the slide page reads them, each checked: cell inside the grid, box, known class and
    finite probabilities."""
    tiles = []
    for line, r in enumerate(_read_csv(path, SLIDE_AGAIN, FEWER_TILES), start=2):
        try:
            tile = {
                "row": int(r["row"]),
                "col": int(r["col"]),
                "x": int(r["x"]),
                "y": int(r["y"]),
                "size": int(r["width"]),
                "class": r["class"],
                "p": {c: _finite(r[f"p_{c}"]) for c in classes},
                "p_carcinoma": _finite(r["p_carcinoma"]),
                "refer": str(r["refer"]),
                "confirmed": r["confirmed"] == "1",
            }
            if not (0 <= tile["row"] < shape[0] and 0 <= tile["col"] < shape[1]):
                raise ValueError(f"cell {tile['row']},{tile['col']} outside the {shape[0]} x {shape[1]} grid")
            if tile["class"] not in classes:
                raise ValueError(f"class {str(tile['class'])[:40]!r} is not one of the bundle's")
        except KeyError as err:
            raise ViewerError(f"{path}: no {err.args[0]} column: not a histoboost tiles.csv; {SLIDE_AGAIN}") from None
        except (TypeError, ValueError) as err:
            raise ViewerError(f"{path}: line {line}: {str(err)[:160]}: {SLIDE_AGAIN}") from None
        tiles.append(tile)
    return tiles


def _finite(text) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _read_csv(path: Path, fix: str, smaller: str) -> list[dict]:
    """A CSV's rows, within MAX_TABLE_BYTES and MAX_ROWS (`smaller` says how to make fewer)."""
    size = path.stat().st_size
    if size > MAX_TABLE_BYTES:
        raise ViewerError(
            f"{path}: {size / 2**20:.1f} MiB, over the {MAX_TABLE_BYTES // 2**20} MiB the viewer reads: {smaller}"
        )
    rows: list[dict] = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if len(rows) == MAX_ROWS:
                    raise ViewerError(f"{path}: more than {MAX_ROWS} rows, the most the viewer shows: {smaller}")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ViewerError(f"{path}: not a readable CSV ({str(err)[:160]}): {fix}") from None
    return rows


def _is_predictions(path: Path) -> bool:
    """A predict CSV (its header starts path,name,image_id,class) or JSON (a list of such records)."""
    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".csv":
        return head.startswith("path,name,image_id,class")
    return path.suffix == ".json" and head.lstrip().startswith("[") and '"image_id"' in head


def _read_json(path: Path, fix: str):
    """Strict JSON (no NaN or Infinity, which the browser's JSON cannot read), within MAX_JSON_BYTES and
    MAX_JSON_DEPTH."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES // 2**20} MiB")
        value = strict_json(path.read_text(encoding="utf-8"))
        if json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            raise RecursionError
    except RecursionError:
        raise ViewerError(f"{path}: not readable JSON (nested deeper than {MAX_JSON_DEPTH} levels): {fix}") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ViewerError(f"{path}: not readable JSON ({str(err)[:160]}): {fix}") from None
    return value
