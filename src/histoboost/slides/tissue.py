"""Where the tissue is: a mask on a thumbnail at a fixed physical resolution, or one the user gives.

The automatic mask follows the family of methods used by CLAM, WSInfer and Slideflow (HSV saturation,
median blur, Otsu's threshold with a floor) with LazySlide's artefact rule (H&E is pink to purple: red
and blue above green; blue, green and black pen marks are not) and sizes in µm² rather than pixels,
so the same slide scanned at 20x or 40x gives the same mask. Pure functions of the thumbnail: the same
slide always gives the same mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .reader import SlideError

MASK_MPP = 8.0  # µm/px of the thumbnail the mask is made on (about 1.25x, as HistoQC and TIAToolbox work)
SATURATION_FLOOR = 8  # of 255: below it nothing is tissue, whatever Otsu says (CLAM's sthresh, WSInfer's 7)
DARK = 40  # max(R, G, B) below this is black ink or a shadow, not stained tissue
CLOSING_UM = 25.0  # gaps narrower than this inside tissue are closed
MIN_TISSUE_UM2 = 200.0**2  # specks smaller than this are dropped (WSInfer's default)
MAX_HOLE_UM2 = 190.0**2  # holes smaller than this are filled (WSInfer's default)
MAX_ROI_BYTES = 64 * 2**20
MAX_ROI_DEPTH = 16  # GeoJSON objects inside objects (a FeatureCollection of GeometryCollections is 4): no more
MAX_ROI_COORDINATE = 1e9  # full-resolution pixels; far beyond any slide (2e10 px in all), and exact in a float
MASK_ASPECT_TOLERANCE = 0.02  # a --tissue-mask's height may differ this much (plus a pixel) from the slide's shape
ROI_FIX = "export the annotations from QuPath (File > Export objects as GeoJSON)"


def tissue_mask(rgb: np.ndarray, mpp: float, floor: int = SATURATION_FLOOR) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail (h, w, 3) whose pixels are `mpp` µm wide."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    rgb16 = rgb.astype(np.int16)
    red, green, blue = rgb16[..., 0], rgb16[..., 1], rgb16[..., 2]
    high, low = rgb16.max(axis=-1), rgb16.min(axis=-1)
    saturation = np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0).astype(np.uint8)
    saturation = ndimage.median_filter(saturation, size=7)
    threshold = floor
    if saturation.min() < saturation.max():
        threshold = max(floor, int(threshold_otsu(saturation)))
    tissue = (saturation > threshold) & (red > green) & (blue > green) & (high >= DARK)
    radius = max(1, round(CLOSING_UM / mpp))
    tissue = ndimage.binary_closing(tissue, structure=disk(radius).astype(bool), border_value=0)
    tissue = _drop_small(tissue, MIN_TISSUE_UM2 / mpp**2)
    return ~_drop_small(~tissue, MAX_HOLE_UM2 / mpp**2, keep_border=True)


def mask_area_mm2(mask: np.ndarray, mpp: float) -> float:
    """The area a mask marks, in mm², when its pixels are `mpp` µm wide."""
    return float(mask.sum()) * mpp**2 / 1e6


def mask_from_png(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A user's mask image (non-zero = tissue; e.g. HistoQC's *_mask_use.png), resized to the slide's thumbnail of
    `shape` (h, w): it must cover the whole slide, so its aspect must be the slide's (within 2% and a pixel)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            expected = width * shape[0] / shape[1]
            if abs(height - expected) > MASK_ASPECT_TOLERANCE * expected + 1:
                raise SlideError(
                    f"{path}: --tissue-mask is {width}x{height} px, not the slide's shape ({shape[1]}:"
                    f"{shape[0]}), so it would be stretched: give a mask of the whole slide (e.g. "
                    "mask.png of an earlier run on it)"
                )
            image.load()
            mask = image.convert("L").resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    except (OSError, Image.DecompressionBombError, ValueError) as err:
        raise SlideError(
            f"{path}: --tissue-mask is not a readable image ({str(err).splitlines()[0]}): give a PNG "
            "whose non-zero pixels mark tissue"
        ) from None
    return np.asarray(mask) > 0


def mask_from_geojson(path: str | Path, shape: tuple[int, int], factor: float) -> np.ndarray:
    """The polygons of a GeoJSON file (a QuPath annotation export, full-resolution pixel coordinates of the
    image frame) rasterised on a thumbnail of `shape` (h, w) with `factor` full-resolution px per pixel, clipped
    to the slide."""
    import shapely

    polygons = read_roi(path)
    canvas = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for clipped in shapely.clip_by_rect(polygons, 0, 0, shape[1] * factor, shape[0] * factor):
        for polygon in getattr(clipped, "geoms", [clipped]):
            if polygon.geom_type != "Polygon" or polygon.is_empty:
                continue
            draw.polygon([(x / factor, y / factor) for x, y in polygon.exterior.coords], fill=1)
            for hole in polygon.interiors:
                draw.polygon([(x / factor, y / factor) for x, y in hole.coords], fill=0)
    mask = np.asarray(canvas, dtype=bool)
    if not mask.any():
        raise SlideError(
            f"{path}: --roi polygons lie outside the slide ({round(shape[1] * factor)}x"
            f"{round(shape[0] * factor)} px): give full-resolution pixel coordinates of this slide "
            "(as QuPath exports them)"
        )
    return mask


def read_roi(path: str | Path) -> list:
    """The polygons of a GeoJSON file, checked: at most MAX_ROI_BYTES, objects nested at most MAX_ROI_DEPTH deep,
    only Polygon and MultiPolygon geometries (alone or in a Feature, FeatureCollection, GeometryCollection or a
    list of them), every vertex two or three finite numbers within MAX_ROI_COORDINATE. Anything else is one line
    naming the file."""
    import shapely

    path = Path(path)
    try:
        if path.stat().st_size > MAX_ROI_BYTES:
            raise ValueError(f"larger than {MAX_ROI_BYTES // 2**20} MiB")
        data = json.loads(path.read_text(encoding="utf-8"), parse_int=float)  # 4000 digits: inf, refused below
    except RecursionError:
        raise SlideError(f"{path}: --roi is nested deeper than any GeoJSON: {ROI_FIX}") from None
    except (OSError, ValueError) as err:
        raise SlideError(
            f"{path}: --roi is not a readable GeoJSON file ({str(err).splitlines()[0]}): {ROI_FIX}"
        ) from None
    polygons = [p for shell, *holes in _roi_rings(path, data, 0) if not (p := shapely.Polygon(shell, holes)).is_empty]
    if not polygons:
        raise SlideError(f"{path}: --roi holds no polygon: draw the region as an area annotation in QuPath")
    return polygons


def _roi_rings(path: Path, node, depth: int) -> list[list[np.ndarray]]:
    """Each polygon of a GeoJSON node as its rings, (n, 2) arrays of finite floats."""
    if depth > MAX_ROI_DEPTH:
        raise SlideError(f"{path}: --roi nests objects more than {MAX_ROI_DEPTH} deep: {ROI_FIX}")
    if isinstance(node, list):  # older QuPath: a list of features
        return [ring for item in node for ring in _roi_rings(path, item, depth + 1)]
    kind = node.get("type") if isinstance(node, dict) else None
    if not isinstance(kind, str):
        what = "an object without a type" if isinstance(node, dict) else f"a JSON {type(node).__name__}"
        raise SlideError(f"{path}: --roi holds {what} where a GeoJSON object belongs: {ROI_FIX}")
    members = {"FeatureCollection": "features", "GeometryCollection": "geometries"}
    if kind in members and isinstance(node.get(members[kind]), list):
        return _roi_rings(path, node[members[kind]], depth + 1)
    if kind == "Feature":
        return [] if node.get("geometry") is None else _roi_rings(path, node["geometry"], depth + 1)
    if kind in ("Polygon", "MultiPolygon"):
        polygons = [node.get("coordinates")] if kind == "Polygon" else node.get("coordinates")
        if not isinstance(polygons, list) or not all(isinstance(p, list) and p for p in polygons):
            raise SlideError(f"{path}: --roi has a {kind} without coordinates: {ROI_FIX}")
        return [[_vertices(path, ring) for ring in polygon] for polygon in polygons]
    raise SlideError(
        f"{path}: --roi holds a {kind[:40]!r} where a Polygon, MultiPolygon, Feature, FeatureCollection "
        "or GeometryCollection belongs: keep only area annotations, and " + ROI_FIX
    )


def _vertices(path: Path, ring) -> np.ndarray:
    try:
        xy = np.asarray(ring, dtype=np.float64)
    except (ValueError, TypeError):
        xy = np.empty(0)
    if xy.ndim == 2 and xy.shape[1] in (2, 3) and not (np.abs(xy) <= MAX_ROI_COORDINATE).all():  # NaN too
        raise SlideError(
            f"{path}: --roi has a vertex that is not a finite number (NaN, Infinity or too large): "
            f"give full-resolution pixel coordinates, and {ROI_FIX}"
        )
    if xy.ndim != 2 or xy.shape[1] not in (2, 3) or len(np.unique(xy[:, :2], axis=0)) < 3:
        raise SlideError(
            f"{path}: --roi has a ring that is not a list of at least 3 distinct [x, y] vertices: {ROI_FIX}"
        )
    return xy[:, :2]


def mask_outline(mask: np.ndarray, factor: float):
    """The mask as a valid shapely (Multi)Polygon in full-resolution image-frame pixels.

    Each row's runs of tissue become boxes, merged exactly by GEOS's union (a coverage union would need
    shared vertices, which boxes of different widths lack), then simplified by one mask pixel:
    scikit-image's contours would need their own hole bookkeeping."""
    import shapely

    boxes: list[shapely.Polygon] = []
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    for y, row in enumerate(np.diff(padded, axis=1)):
        starts, ends = np.flatnonzero(row == 1), np.flatnonzero(row == -1)
        boxes.extend(
            shapely.box(x0 * factor, y * factor, x1 * factor, (y + 1) * factor) for x0, x1 in zip(starts, ends)
        )
    if not boxes:
        return shapely.MultiPolygon()
    return polygonal(shapely.unary_union(boxes).simplify(factor, preserve_topology=True))


def polygonal(geometry):
    """A valid Polygon or MultiPolygon on a 0.01 px grid: `make_valid` and snapping may leave lines and points
    beside the areas (a GeometryCollection), which QuPath would not read as one region."""
    import shapely

    geometry = shapely.make_valid(shapely.set_precision(geometry, 0.01))
    parts = [
        p
        for g in getattr(geometry, "geoms", [geometry])
        for p in getattr(g, "geoms", [g])
        if p.geom_type == "Polygon" and not p.is_empty
    ]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def _drop_small(mask: np.ndarray, min_pixels: float, keep_border: bool = False) -> np.ndarray:
    """`mask` without its connected parts smaller than `min_pixels` (those touching the border kept when asked:
    the background around the tissue is not a hole)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    if keep_border:
        keep[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    keep[0] = False
    return keep[labels]
