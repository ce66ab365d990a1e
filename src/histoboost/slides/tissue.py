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
    """A user's mask image (non-zero = tissue; e.g. HistoQC's *_mask_use.png), stretched over the slide's
    thumbnail of `shape` (h, w): it must cover the whole slide."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mask = image.convert("L").resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    except (OSError, Image.DecompressionBombError, ValueError) as err:
        raise SlideError(f"{path}: --tissue-mask is not a readable image ({str(err).splitlines()[0]}): give a PNG "
                         "whose non-zero pixels mark tissue") from None
    return np.asarray(mask) > 0


def mask_from_geojson(path: str | Path, shape: tuple[int, int], factor: float) -> np.ndarray:
    """The polygons of a GeoJSON file (a QuPath annotation export, full-resolution pixel coordinates of the
    image frame) rasterised on a thumbnail of `shape` (h, w) with `factor` full-resolution px per pixel."""
    from shapely.geometry import shape as to_geometry

    path = Path(path)
    try:
        if path.stat().st_size > MAX_ROI_BYTES:
            raise ValueError(f"larger than {MAX_ROI_BYTES // 2**20} MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
        features = data if isinstance(data, list) else data.get("features", [data])
        geometries = [to_geometry(f.get("geometry", f)) for f in features if isinstance(f, dict)]
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise SlideError(f"{path}: --roi is not a readable GeoJSON file ({str(err).splitlines()[0]}): export the "
                         "annotations from QuPath (File > Export objects as GeoJSON)") from None
    canvas = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    polygons = [p for g in geometries for p in getattr(g, "geoms", [g]) if p.geom_type == "Polygon" and not p.is_empty]
    if not polygons:
        raise SlideError(f"{path}: --roi holds no polygon: draw the region as an area annotation in QuPath")
    for polygon in polygons:
        draw.polygon([(x / factor, y / factor) for x, y in polygon.exterior.coords], fill=1)
        for hole in polygon.interiors:
            draw.polygon([(x / factor, y / factor) for x, y in hole.coords], fill=0)
    return np.asarray(canvas, dtype=bool)


def mask_outline(mask: np.ndarray, factor: float):
    """The mask as a valid shapely (Multi)Polygon in full-resolution image-frame pixels.

    Each row's runs of tissue become boxes, merged exactly by GEOS's union (a coverage union would need
    shared vertices, which boxes of different widths lack), then simplified by one mask pixel:
    scikit-image's contours would need their own hole bookkeeping."""
    import shapely

    boxes = []
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    for y, row in enumerate(np.diff(padded, axis=1)):
        starts, ends = np.flatnonzero(row == 1), np.flatnonzero(row == -1)
        boxes.extend(shapely.box(x0 * factor, y * factor, x1 * factor, (y + 1) * factor) for x0, x1 in zip(starts, ends))
    if not boxes:
        return shapely.MultiPolygon()
    return polygonal(shapely.unary_union(boxes).simplify(factor, preserve_topology=True))


def polygonal(geometry):
    """A valid Polygon or MultiPolygon on a 0.01 px grid: `make_valid` and snapping may leave lines and points
    beside the areas (a GeometryCollection), which QuPath would not read as one region."""
    import shapely

    geometry = shapely.make_valid(shapely.set_precision(geometry, 0.01))
    parts = [p for g in getattr(geometry, "geoms", [geometry]) for p in getattr(g, "geoms", [g])
             if p.geom_type == "Polygon" and not p.is_empty]
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
