"""What the viewer was given: slide result folders (from `histoboost slide`) and image predictions (from
`histoboost predict`), found and checked once at start-up; each is served only from its own folder."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import HistoboostError

MAX_JSON_BYTES = 64 * 2**20


class ViewerError(HistoboostError):
    """A result cannot be shown; the message names it and the fix."""


@dataclass
class SlideResult:
    """One slide's output folder: its summary, per-tile rows and grid, and the slide file it was made from."""

    name: str
    folder: Path
    summary: dict
    rows: list[dict]
    grid: dict[str, np.ndarray]
    slide_path: Path


@dataclass
class ImageResults:
    """One `predict` output (CSV or JSON): its records and the folder its overlays are served from."""

    name: str
    folder: Path
    records: list[dict]
    overlays: dict[str, str] = field(default_factory=dict)  # overlay file name -> path relative to `folder`


def find_results(paths: list[str | Path]) -> tuple[list[SlideResult], list[ImageResults]]:
    """Slide result folders (a folder with summary.json, or an OUT folder of several), and predictions files
    (a predict CSV/JSON, or a folder holding them)."""
    slides, images = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise ViewerError(f"{path}: no such file or folder")
        if path.is_dir() and (path / "summary.json").is_file():
            slides.append(load_slide_result(path))
        elif path.is_dir():
            found_slides = sorted(p.parent for p in path.glob("*/summary.json"))
            found_images = sorted(p for p in path.glob("*") if p.suffix in (".csv", ".json") and _is_predictions(p))
            if not found_slides and not found_images:
                raise ViewerError(f"{path}: holds no slide result (summary.json) or predictions (a predict CSV/JSON): "
                                  "give the folder `histoboost slide --out` or `predict --out` wrote")
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
    summary = _read_json(folder / "summary.json")
    try:
        slide_path = Path(summary["slide"]["path"])
        with open(folder / "tiles.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        with np.load(folder / "heatmap.npz", allow_pickle=False) as data:
            grid = {k: data[k] for k in data.files}
    except (KeyError, TypeError, OSError, ValueError) as err:
        raise ViewerError(f"{folder}: not a complete slide result ({err}): run histoboost slide again") from None
    return SlideResult(folder.name, folder.resolve(), summary, rows, grid, slide_path)


def load_predictions(path: Path) -> ImageResults:
    """A predict output file; overlay PNGs are looked up by name in its folder and the folders inside it."""
    try:
        if path.suffix == ".json":
            records = _read_json(path)
            if not isinstance(records, list):
                raise ValueError("not a list of records")
        else:
            with open(path, newline="", encoding="utf-8") as handle:
                records = list(csv.DictReader(handle))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ViewerError(f"{path}: not a readable predict output ({err})") from None
    folder = path.parent.resolve()
    overlays = {}
    for candidate in [*folder.glob("*.overlay.png"), *folder.glob("*/*.overlay.png")]:
        overlays.setdefault(candidate.name, candidate.relative_to(folder).as_posix())
    return ImageResults(path.stem, folder, [dict(r) for r in records if isinstance(r, dict)], overlays)


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


def _read_json(path: Path):
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES // 2**20} MiB")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ViewerError(f"{path}: not readable JSON ({err})") from None
