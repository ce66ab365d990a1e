"""One slide from file to outputs, and many slides into one folder with a slides.csv.

`predict_slide` opens the slide, makes (or takes) the tissue mask, lays the tile grid at the model's field
of view and µm/px, scores the tiles with the model's `inference.Predictor` (`score`) and writes the outputs
(`export`) into OUT/<result name>/ (`result_name`), staged and renamed into place so a folder is whole or absent.
Settings are one typed object, written into summary.json and hashed into the tile cache's key. Whatever goes wrong
with one slide (a damaged file, a forged header, memory, a full disk) becomes that slide's one line in slides.csv,
locally and on Dask.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from openslide import OpenSlideError
from PIL.Image import DecompressionBombError

from .. import storage
from ..errors import HistoboostError
from ..inference import Predictor
from ..outputs import OutputError, check_writable, csv_text, staged_folder
from ..runtime import Runtime
from ..storage import write_text_atomic
from ..version import __version__
from . import export
from .reader import MAX_PIXELS, Slide, SlideError, open_slide
from .score import Geometry, TileCache, TileScores, cache_key, score_tiles
from .tiles import TileGrid, tile_grid
from .tissue import MASK_MPP, mask_area_mm2, mask_from_geojson, mask_from_png, mask_outline, tissue_mask

BACH_MPP = 0.42  # µm/px of BACH's microscopy images (Aresta et al. 2019): assumed for bundles that do not know
BACH_FIELD_PX = 1536  # shorter side of the shared BACH copies: with 0.42 µm/px a 645 µm field
SLIDE_SUFFIXES = {
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
}
MIN_TISSUE_MM2 = 1.0  # below this a slide-level call rests on too little tissue: referred
RESEARCH_ONLY = (
    "Research use only; not for diagnosis. No slide-level accuracy has been measured: tile scores are "
    "the image classifier's, applied to slide regions."
)
# What reading or writing one slide may raise (MemoryError includes numpy's _ArrayMemoryError, ValueError
# tifffile's errors): the slide's one line, never the run's end.
SLIDE_FAILURES = (HistoboostError, OSError, ValueError, MemoryError, OpenSlideError, DecompressionBombError)
TABLE_FIELDS = [
    "slide",
    "status",
    "call",
    "tissue_mm2",
    "carcinoma_regions",
    "largest_region_mm2",
    "refer",
    "out",
    "error",
]  # slides.csv's first columns (then area_<class>_mm2 per class)
CALL_RULE = (
    "the most severe group decided on a tile confirmed with the bundle's full augmentation vote "
    "(every scored tile when nothing was confirmed); normal/benign when none"
)


@dataclass(frozen=True)
class SlideSettings:
    """How slides are tiled and scored (defaults: docs/slides.md)."""

    mpp: float | None = None  # the slide's µm/px when the file states none
    train_mpp: float | None = None  # the training images' µm/px when the bundle does not know it
    tile_um: float | None = None  # tile side; default: the training images' field of view
    stride_um: float | None = None  # default: the tile side (no overlap)
    min_tissue: float = 0.5  # keep a tile when this share of it is tissue
    augmentations: int = 0  # views per tile for the map (0: one un-augmented view)
    confirm_top: int = 20  # re-score this many most-suspicious tiles with the bundle's full vote
    stain_fit: str = "slide"  # one Macenko fit per slide, or per tile as predict does per image
    tissue_mask: str | None = None  # a mask PNG instead of the automatic one
    roi: str | None = None  # a GeoJSON of regions: only tissue inside them is tiled
    max_pixels: float = MAX_PIXELS  # a slide whose header claims more full-resolution pixels is refused
    features: bool = False  # also write each tile's features, <slide>.h5 in TRIDENT's layout

    def scoring(self) -> dict:
        """The settings that change tile results (the cache key's part: features change none; a chunk stored
        without them is computed again when they are wanted)."""
        return {"augmentations": self.augmentations, "stain_fit": self.stain_fit}


@dataclass
class TissueTiles:
    """Where a slide's tissue is and how it is tiled: the thumbnail the mask was made on (`factor` full-resolution
    px per pixel), the mask and how it was made, its area, the whole grid and the tiles kept for scoring."""

    thumb: np.ndarray
    factor: float
    mask: np.ndarray
    mask_source: str
    tissue_mm2: float
    grid: TileGrid
    kept: TileGrid


@dataclass
class SlideResult:
    """A finished slide: where its outputs are, its summary, and the per-tile table."""

    path: Path
    out: Path
    summary: dict
    rows: list[dict]
    grid: TileGrid
    scores: TileScores


def slide_geometry(predictor: Predictor, settings: SlideSettings) -> Geometry:
    """Tile side and working µm/px from the model (its training images' field of view and the resolution its
    classifier saw), with the user's overrides; models that do not record them assume BACH's 0.42 µm/px."""
    data = predictor.identity.geometry
    notes = []
    train_mpp = settings.train_mpp or data.mpp
    if train_mpp is None:
        train_mpp = BACH_MPP
        notes.append(
            f"the bundle does not know its training images' µm/px: assumed BACH's {BACH_MPP} (override "
            "with --train-mpp)"
        )
    working = data.working_mpp if settings.train_mpp is None else None
    if working is None:
        pre = predictor.config.preprocess
        working = pre.target_mpp if pre.target_mpp is not None and data.mpp else train_mpp / pre.scale
    field_px = data.field_px
    if field_px is None and settings.tile_um is None:
        field_px = BACH_FIELD_PX
        notes.append(f"the bundle does not record its training images' size: assumed BACH's {BACH_FIELD_PX} px")
    tile_um = settings.tile_um or (field_px or BACH_FIELD_PX) * train_mpp  # field_px is set when tile_um is not
    return Geometry(float(tile_um), float(settings.stride_um or tile_um), float(working), tuple(notes))


def predict_slide(
    predictor: Predictor, path: str | Path, out: str | Path, settings: SlideSettings = SlideSettings()
) -> SlideResult:
    """Score one slide with a model and write its outputs into `out` (OUT/<result_name>/ for the CLI), on the
    predictor's runtime (its cache folder keeps finished tiles, so an interrupted slide resumes)."""
    from ..features import default_cache_dir

    started = time.perf_counter()
    path, out = Path(path), Path(out).absolute()
    geometry = slide_geometry(predictor, settings)
    for note in geometry.notes:
        warnings.warn(note, stacklevel=2)
    slide = open_slide(path, settings.mpp, settings.max_pixels)
    try:
        _check_out(out, slide)
        layout = tissue_tiles(slide, geometry, settings)
        kept = layout.kept
        if len(kept) == 0:
            raise SlideError(
                f"{path}: no tile of {geometry.tile_um:.0f} µm is {settings.min_tissue:.0%} tissue "
                f"(tissue found: {layout.tissue_mm2:.2f} mm²): a blank slide? Give the "
                "tissue with --tissue-mask or --roi, or lower --min-tissue"
            )
        key = cache_key(slide, predictor.identity.sha256, kept, geometry, settings.scoring())
        cache_dir = predictor.runtime.cache_dir or default_cache_dir()
        cache = TileCache(storage.local_folder(cache_dir, "slide tile caches") / "slides" / key[:32])
        scores = score_tiles(
            predictor,
            slide,
            kept,
            geometry,
            settings.augmentations,
            settings.confirm_top,
            settings.stain_fit,
            cache,
            settings.features,
        )
        try:
            with staged_folder(out, force=True) as staging:
                result = _write(staging, predictor, slide, layout, scores, geometry, settings, started, cache.reused)
        except OSError as err:  # a full disk, a folder gone: name the slide and the file
            raise SlideError(
                f"{path}: its results could not be written to {err.filename or out} "
                f"({err.strerror or err}): free some space or choose another --out"
            ) from None
        return SlideResult(path, out, result[0], result[1], kept, scores)
    finally:
        slide.close()


def tissue_tiles(slide: Slide, geometry: Geometry, settings: SlideSettings) -> TissueTiles:
    """The tissue mask on an 8 µm/px thumbnail (or the user's) and the tile grid over it."""
    thumb, factor = slide.thumbnail(max(MASK_MPP, slide.mpp))
    mask, mask_source = _mask(slide, thumb, factor, settings)
    grid = tile_grid(mask, factor, slide.size, geometry.tile_um / slide.mpp, geometry.stride_um / slide.mpp)
    return TissueTiles(
        thumb,
        factor,
        mask,
        mask_source,
        mask_area_mm2(mask, factor * slide.mpp),
        grid,
        grid.subset(grid.tissue >= settings.min_tissue),
    )


def _mask(slide: Slide, thumb: np.ndarray, factor: float, settings: SlideSettings) -> tuple[np.ndarray, str]:
    if settings.tissue_mask:
        mask, source = mask_from_png(settings.tissue_mask, thumb.shape[:2]), f"--tissue-mask {settings.tissue_mask}"
    else:
        mask, source = tissue_mask(thumb, factor * slide.mpp), "automatic (saturation, Otsu with a floor, ink filter)"
    if settings.roi:
        mask &= mask_from_geojson(settings.roi, thumb.shape[:2], factor)
        source += f", inside --roi {settings.roi}"
    return mask, source


def _check_out(out: Path, slide: Slide) -> None:
    """Refuse a folder that holds anything but an earlier result of this same slide (which is replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SlideError(f"{out} is a file: give another --out")
    summary = out / "summary.json"
    if summary.is_file():
        try:
            fingerprint = json.loads(summary.read_text(encoding="utf-8"))["slide"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            fingerprint = None
        if fingerprint == slide.fingerprint:
            return
        raise SlideError(
            f"{out} holds the result of another slide ({fingerprint}): give another --out, or rename "
            f"{slide.path.name} (two slides of the same name cannot share an output folder)"
        )
    if any(out.iterdir()):
        raise SlideError(f"{out} holds files that are not a histoboost slide result: give another --out")


def _write(
    folder: Path,
    predictor: Predictor,
    slide: Slide,
    layout: TissueTiles,
    scores: TileScores,
    geometry: Geometry,
    settings: SlideSettings,
    started: float,
    reused: int,
) -> tuple[dict, list[dict]]:
    thumb, factor, mask, grid, kept = layout.thumb, layout.factor, layout.mask, layout.grid, layout.kept
    scheme, model = predictor.classes, predictor.identity
    mpp = slide.mpp
    rows = export.tile_rows(kept, scores, scheme)
    export.write_tiles_csv(folder / "tiles.csv", rows, scheme)
    export.write_heatmap_npz(folder / "heatmap.npz", kept, scores, scheme, mpp)
    export.write_mask_png(folder / "mask.png", mask)
    export.write_mask_outline_png(folder / "mask-outline.png", thumb, mask)
    display_mpp = max(mpp, max(slide.size) * mpp / export.HEATMAP_MAX_SIDE)
    picture, picture_factor = (thumb, factor) if display_mpp >= factor * mpp else slide.thumbnail(display_mpp)
    export.write_heatmap_png(
        folder / "heatmap.png", picture, picture_factor, kept, scores, scheme, mpp, slide.path.name
    )
    regions = export.carcinoma_regions(kept, scores, scheme, slide.size)
    region_classes = [_region_class(region, kept, scores, scheme) for region in regions]
    tissue = mask_outline(mask, factor)
    region_mm2 = [export.tissue_mm2(region, tissue, mpp) for region in regions]
    geojson = f"{result_name(slide.path)}.geojson.gz"
    ids = f"{slide.fingerprint}|{model.sha256}"
    cell_mm2 = (kept.stride_px * mpp) ** 2 / 1e6
    area = {
        c: round(float(kept.tissue[scores.decision == k].sum() * cell_mm2), 4) for k, c in enumerate(scheme.classes)
    }
    p_carcinoma = export.carcinoma(scheme, scores.probs)
    top = [int(i) for i in np.argsort(-p_carcinoma, kind="stable")[:8]]
    summary: dict[str, Any] = {
        "research_use_only": RESEARCH_ONLY,
        "slide": {
            "path": str(slide.path.resolve()),
            "name": slide.path.name,
            "fingerprint": slide.fingerprint,
            "vendor": slide.vendor,
            "mpp": mpp,
            "mpp_source": slide.mpp_source,
            "size": list(slide.size),
            "bounds_offset": list(slide.origin),
            "levels": [round(d, 4) for d in slide.downsamples],
            "coordinates": "full-resolution pixels from the bounds offset (QuPath's and Deep Zoom's origin)",
        },
        "bundle": {
            "sha256": model.sha256,
            "classes": list(scheme.classes),
            "groups": list(scheme.groups),
            "colors": [list(export.class_color(scheme, k)) for k in range(len(scheme.classes))],
            "histoboost": model.histoboost,
        },
        "histoboost": __version__,
        "settings": asdict(settings),
        "geometry": {
            **asdict(geometry),
            "notes": list(geometry.notes),
            "tile_px": geometry.tile_size(),
            "tile_px_full_resolution": round(kept.tile_px, 3),
            "grid": list(grid.shape),
        },
        "tissue": {
            "area_mm2": round(layout.tissue_mm2, 4),
            "mask": layout.mask_source,
            "mask_mpp": round(factor * mpp, 4),
        },
        "tiles": {
            "in_grid": len(grid),
            "scored": len(kept),
            "below_min_tissue": len(grid) - len(kept),
            "confirmed": int(scores.confirmed.sum()),
            "referred": sum(bool(r) for r in scores.refer),
        },
        "stain": scores.stain,
        "area_mm2": area,
        "carcinoma_regions": {
            "count": len(regions),
            "largest_mm2": round(max(region_mm2, default=0.0), 4),
            "area": "tissue inside the region's tile cells",
            "regions": [
                {"area_mm2": round(a, 4), "class": c, "bounds": [round(b) for b in r.bounds]}
                for r, c, a in zip(regions, region_classes, region_mm2)
            ],
        },
        "call": _call(scores, scheme),
        "refer": _referral(layout.tissue_mm2, scores),
        "top_tiles": [
            {k: rows[i][k] for k in ("x", "y", "width", "height", "class", "p_carcinoma", "confirmed")} for i in top
        ],
        "files": {
            "tiles": "tiles.csv",
            "heatmap": "heatmap.png",
            "grid": "heatmap.npz",
            "mask": "mask.png",
            "geojson": geojson,
            "report": "report.html",
        },
    }
    summary["geojson_features"] = export.write_geojson(
        folder / geojson, rows, scheme, slide.size, tissue, regions, region_classes, region_mm2, ids, mpp
    )
    if scores.features is not None:
        summary["files"]["features"] = f"{result_name(slide.path)}.h5"
        export.write_features_h5(  # coords in OpenSlide's level 0, as TRIDENT and CLAM read regions
            folder / summary["files"]["features"],
            kept,
            scores.features,
            slide.origin,
            _encoder(predictor, slide, geometry),
        )
    seconds = time.perf_counter() - started
    summary["run"] = {
        "seconds": round(seconds, 2),
        "tiles_per_second": round(len(kept) / seconds, 3),
        "chunks_reused": reused,
    }
    pictures = export.write_tile_pictures(folder / "top", slide, rows, top)
    export.write_report(folder / "report.html", summary, rows, top, pictures)
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary, rows


def _encoder(predictor: Predictor, slide: Slide, geometry: Geometry) -> dict:
    """What a features file says of how its rows were made: the encoder (backbones, their weights, the descriptor
    the classifier sees), the resolution and the model."""
    return {
        "encoder": "+".join(b.name for b in predictor.backbones),
        "weights_sha256": ",".join(b.weights_sha256 for b in predictor.backbones),
        "descriptor": predictor.config.features.descriptor,
        "mpp": slide.mpp,
        "target_mpp": geometry.working_mpp,
        "bundle_sha256": predictor.identity.sha256,
        "histoboost": __version__,
    }


def _region_class(region, grid: TileGrid, scores: TileScores, scheme) -> str:
    """The carcinoma class most of a region's tiles were given."""
    import shapely

    centres = shapely.points((grid.boxes[:, 0] + grid.boxes[:, 2]) / 2, (grid.boxes[:, 1] + grid.boxes[:, 3]) / 2)
    inside = shapely.contains(region, centres) & (np.asarray(scheme.groups)[scores.decision] > 0)
    counts = np.bincount(scores.decision[inside], minlength=len(scheme.classes))
    return scheme.classes[int(np.argmax(counts))]


def _call(scores: TileScores, scheme) -> dict:
    from ..data import GROUP_NAMES

    basis = scores.confirmed if scores.confirmed.any() else np.ones(len(scores.decision), dtype=bool)
    groups = np.asarray(scheme.groups)[scores.decision[basis]]
    group = int(groups.max()) if len(groups) else 0
    tiles = int((groups == group).sum()) if group else 0
    return {"group": GROUP_NAMES[group], "tiles": tiles, "rule": CALL_RULE}


def _referral(tissue_mm2: float, scores: TileScores) -> list[str]:
    reasons = []
    if tissue_mm2 < MIN_TISSUE_MM2:
        reasons.append(f"little tissue ({tissue_mm2:.2f} mm² < {MIN_TISSUE_MM2:g})")
    if scores.stain_refer:
        reasons.append(scores.stain_refer)
    confirmed_refer = [r for r, c in zip(scores.refer, scores.confirmed) if c and r]
    if confirmed_refer:
        reasons.append(f"{len(confirmed_refer)} confirmed tile(s) referred ({confirmed_refer[0]})")
    return reasons


# -- many slides --------------------------------------------------------------------------------------------


def find_slides(paths: Sequence[str | Path]) -> list[Path]:
    """Slide files given, and those inside given folders (by suffix; MRXS companions folders are skipped)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES))
        else:
            found.append(path)
    return found


def result_name(path: Path) -> str:
    """The name of a slide's result folder: its stem, with characters no folder name should hold (control and
    other unprintable characters, path separators, undecodable bytes) replaced by "_", and "slide-" before a stem
    that is empty or starts with a dot ("..svs", ".hidden.svs"): never OUT itself, outside it, or hidden."""
    name = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in path.stem)
    return name if name and not name.startswith(".") else f"slide-{name}"


def table_name(shard: tuple[int, int] | None) -> str:
    return f"slides-{shard[0]}-of-{shard[1]}.csv" if shard else "slides.csv"


def check_slides_out(out: Path, shard: tuple[int, int] | None = None) -> None:
    """Before any work: OUT can be written, and its slides.csv, if there is one, is an earlier run's (its header
    is histoboost's): a file histoboost did not write is never overwritten."""
    check_writable(out)
    table = Path(out) / table_name(shard)
    if not (table.exists() or table.is_symlink()):
        return
    try:
        with open(table, encoding="utf-8") as handle:
            header = handle.readline().rstrip("\n").split(",")
    except (OSError, UnicodeDecodeError):
        header = []
    if header[: len(TABLE_FIELDS)] != TABLE_FIELDS:
        raise OutputError(
            f"{table} exists and was not written by histoboost slide: move it away or choose another --out"
        )


@dataclass(frozen=True)
class ModelSource:
    """Where a Dask worker gets the model: the bundle's path, its identity (the worker refuses another), the user's
    own weights files, and the function that loads them into a Predictor (`bundle.load_predictor`, named here so
    that slides never import the bundle module)."""

    path: str
    sha256: str
    weights: dict[str, str]
    load: Callable[[str, str, dict[str, str], Runtime], Predictor]


@dataclass(frozen=True)
class SlideTask:
    """One engine task: a slide to score into OUT/<result_name>/ with the model at `source`, on the client's device,
    batch and tile readers, at `threads` torch threads."""

    source: ModelSource
    path: Path
    out: Path
    settings: SlideSettings
    runtime: Runtime
    threads: int


def predict_slides(
    predictor: Predictor,
    paths: Sequence[str | Path],
    out: str | Path,
    settings: SlideSettings = SlideSettings(),
    on_result: Callable[[dict], Any] | None = None,
    shard: tuple[int, int] | None = None,
    source: ModelSource | None = None,
) -> list[dict]:
    """Every slide (or share `shard` K of N of them, by file name) into OUT/<stem>/; one bad slide does not stop
    the others. Writes OUT/slides.csv (OUT/slides-K-of-N.csv for a shard; one row per slide: call, areas, refer,
    status or error) and returns its rows. On the runtime's Dask engine each slide is a task: a worker loads the
    model from `source` (checked to be this very model by its sha256) and writes the slide's folder itself."""
    from ..engine import TaskLost, shard_of

    out = Path(out)
    runtime = predictor.runtime
    engine = runtime.engine
    check_slides_out(out, shard)
    out.mkdir(parents=True, exist_ok=True)
    slides = find_slides(paths)
    if shard:
        slides = shard_of(slides, shard, lambda p: p.name)
    rows: dict[Path, dict] = {}
    if engine is None or engine.kind == "local":
        results = ((path, slide_row(predictor, path, out, settings)) for path in slides)
    else:
        if source is None:
            raise SlideError("scoring slides on Dask workers needs the bundle's path (workers load it themselves)")
        # Workers may run elsewhere, in another folder: every path they get is absolute.
        source = replace(
            source,
            path=str(Path(source.path).absolute()),
            weights={name: str(Path(file).absolute()) for name, file in source.weights.items()},
        )
        absolute: dict[str, Any] = {
            k: str(Path(v).absolute()) for k in ("tissue_mask", "roi") if (v := getattr(settings, k))
        }
        local = replace(settings, **absolute)
        cache = (
            None
            if runtime.cache_dir is None
            else storage.local_folder(runtime.cache_dir, "slide tile caches").absolute()
        )
        on_worker = replace(runtime, cache_dir=cache, progress=False, engine=None)
        tasks = [
            SlideTask(source, path.absolute(), out.absolute(), local, on_worker, engine.threads or 1) for path in slides
        ]
        results = (
            (task.path, _lost_row(task.path, row) if isinstance(row, TaskLost) else row)
            for task, row in engine.map(slide_task, tasks)
        )
    for path, row in results:
        rows[Path(path).absolute()] = row
        if on_result is not None:
            on_result(row)
    ordered = [rows[p.absolute()] for p in slides]
    fields = list(dict.fromkeys([*TABLE_FIELDS, *(k for row in ordered for k in row)]))  # a header even when empty
    write_text_atomic(out / table_name(shard), csv_text(ordered, fields))
    return ordered


def slide_row(predictor: Predictor, path: Path, out: Path, settings: SlideSettings) -> dict:
    """Score one slide into OUT/<result_name>/ and say how it went as one slides.csv row (errors become the
    row's)."""
    row = _row(path)
    try:
        result = predict_slide(predictor, path, out / result_name(path), settings)
    except SLIDE_FAILURES as err:
        row.update(status="error", error=failure(path, err))
    else:
        s = result.summary
        row.update(
            call=s["call"]["group"],
            tissue_mm2=s["tissue"]["area_mm2"],
            carcinoma_regions=s["carcinoma_regions"]["count"],
            largest_region_mm2=s["carcinoma_regions"]["largest_mm2"],
            refer="; ".join(s["refer"]),
            out=str(result.out),
            **{f"area_{c}_mm2": a for c, a in s["area_mm2"].items()},
        )
    return row


def slide_task(task: SlideTask) -> dict:
    """Run a `SlideTask` on a worker: the model is loaded once per worker process and refused unless it is the
    client's."""
    from ..engine import check_threads, process_resource

    check_threads(task.threads)
    source, runtime = task.source, task.runtime
    predictor = process_resource(
        ("bundle", source.path, source.sha256, runtime.device),
        lambda: source.load(source.path, source.sha256, source.weights, runtime),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the client said the geometry notes once
        return slide_row(predictor, task.path, task.out, task.settings)


def failure(path: Path, err: BaseException) -> str:
    """One line for slides.csv and the report that names the slide (and, for a system error, the file)."""
    reason = (str(err).splitlines() or [""])[0] or type(err).__name__
    if isinstance(err, HistoboostError):
        return reason  # names the file and the fix already
    if isinstance(err, MemoryError):
        return (
            f"{path}: ran out of memory reading it ({reason}): a damaged header or a slide too large for this "
            "machine; check its size with openslide-show-properties"
        )
    if isinstance(err, OSError) and err.filename:
        return f"{path}: {err.strerror or reason} ({err.filename}): fix it and rerun (finished tiles are reused)"
    return (
        f"{path}: could not be read ({type(err).__name__}: {reason}): the file is damaged; copy or export it "
        "again (openslide-show-properties and openslide-write-png check it)"
    )


def _row(path: Path, **fields) -> dict:
    """A slides.csv row: the slide, then what is known (an error row leaves the results empty)."""
    return {**dict.fromkeys(TABLE_FIELDS, ""), "slide": str(path), "status": "ok", **fields}


def _lost_row(path: Path, lost) -> dict:
    return _row(
        path, status="error", error=f"{path}: not scored: {lost.reason}; check the file with openslide-show-properties"
    )
