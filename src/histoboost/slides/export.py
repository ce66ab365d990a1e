"""A scored slide's outputs: tiles.csv, heatmap.npz/png, mask.png, QuPath GeoJSON, summary.json, report.html.

Every coordinate is in the slide's image frame (full-resolution pixels from the bounds origin, see
`reader`), taken from the tile grid's boxes: one source of truth, so the CSV, the GeoJSON and the pictures
cannot disagree. The GeoJSON follows what QuPath 0.4 and 0.5 read (`objectType` "tile" detections with
a `classification` {name, color} and numeric `measurements`, a few "annotation" outlines), written with
the standard json module: paquo needs a QuPath install and is GPL, and TIAToolbox's export drops the
probabilities.
"""

from __future__ import annotations

import gzip
import html
import json
import math
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import ClassScheme
from ..outputs import csv_text
from .score import TileScores
from .tiles import TileGrid
from .tissue import polygonal

# Okabe & Ito's colour-blind-safe palette, by diagnostic group (bach4's normal: sky blue, benign: blue).
GROUP_COLORS = {0: (0, 114, 178), 1: (230, 159, 0), 2: (213, 94, 0)}
CLASS_COLORS = {"normal": (86, 180, 233), "benign": (0, 114, 178)}
TISSUE_COLOR = (120, 120, 120)
REGION_COLOR = (204, 121, 167)
_NAMESPACE = uuid.UUID("0d5b9c61-63a1-4b8e-9d3c-8f1e2b6a7c40")  # histoboost's UUIDv5 namespace for object ids
HEATMAP_MAX_SIDE = 1600  # pixels of the heat map picture's longer side


def class_color(scheme: ClassScheme, k: int) -> tuple[int, int, int]:
    return CLASS_COLORS.get(scheme.classes[k], GROUP_COLORS[scheme.groups[k]])


def carcinoma(scheme: ClassScheme, probs: np.ndarray) -> np.ndarray:
    """p(in situ) + p(invasive) per row of class probabilities (N, K)."""
    return probs[:, np.asarray(scheme.groups) > 0].sum(axis=1)


# -- tables and arrays --------------------------------------------------------------------------------


def tile_rows(grid: TileGrid, scores: TileScores, scheme: ClassScheme) -> list[dict]:
    """One row per scored tile: its box, tissue fraction, probabilities, decision and referral."""
    p_carcinoma = carcinoma(scheme, scores.probs)
    rows = []
    for i, (x0, y0, x1, y1) in enumerate(grid.boxes.tolist()):
        k = int(scores.decision[i])
        rows.append(
            {
                "x": x0,
                "y": y0,
                "width": x1 - x0,
                "height": y1 - y0,
                "row": int(grid.rows[i]),
                "col": int(grid.cols[i]),
                "tissue_fraction": round(float(grid.tissue[i]), 4),
                **{f"p_{c}": round(float(p), 6) for c, p in zip(scheme.classes, scores.probs[i])},
                "p_carcinoma": round(float(p_carcinoma[i]), 6),
                "class": scheme.classes[k],
                "group": scheme.groups[k],
                "agreement": round(float(scores.agreement[i]), 3),
                "confirmed": int(scores.confirmed[i]),
                "refer": scores.refer[i],
            }
        )
    return rows


def write_tiles_csv(path: Path, rows: list[dict], scheme: ClassScheme) -> None:
    fields = [
        "x",
        "y",
        "width",
        "height",
        "row",
        "col",
        "tissue_fraction",
        *(f"p_{c}" for c in scheme.classes),
        "p_carcinoma",
        "class",
        "group",
        "agreement",
        "confirmed",
        "refer",
    ]
    path.write_text(csv_text(rows, fields), encoding="utf-8")


def write_heatmap_npz(path: Path, grid: TileGrid, scores: TileScores, scheme: ClassScheme, mpp: float) -> None:
    """The grid, one cell per tile (never pixels): probabilities (rows, cols, K) and p(carcinoma) (NaN where
    no tile was scored), decision (-1 there), tissue fraction, and the geometry that places it on the slide."""
    rows, cols = grid.shape
    probs = np.full((rows, cols, len(scheme.classes)), np.nan, dtype=np.float32)
    decision = np.full((rows, cols), -1, dtype=np.int8)
    tissue = np.zeros((rows, cols), dtype=np.float32)
    probs[grid.rows, grid.cols] = scores.probs
    decision[grid.rows, grid.cols] = scores.decision
    tissue[grid.rows, grid.cols] = grid.tissue
    p_carcinoma = np.where(decision >= 0, probs[..., np.asarray(scheme.groups) > 0].sum(axis=-1), np.nan)
    np.savez_compressed(
        path,
        probs=probs,
        p_carcinoma=p_carcinoma.astype(np.float32),
        decision=decision,
        tissue=tissue,
        classes=np.array(scheme.classes),
        start=np.array(grid.start),
        tile_px=np.float64(grid.tile_px),
        stride_px=np.float64(grid.stride_px),
        mpp=np.float64(mpp),
    )


def write_features_h5(
    path: Path, grid: TileGrid, features: np.ndarray, origin: tuple[int, int], attributes: dict
) -> None:
    """Per-tile features for slide-level models in TRIDENT's and CLAM's layout: `features` (N, D) float32, `coords`
    (N, 2) int64 top-left x, y in OpenSlide's level-0 pixels (where those tools read regions: tiles.csv's x, y plus
    the bounds offset, recorded as `bounds_offset`), and attributes (`patch_size_level0`, µm/px, the encoder and its
    weights, histoboost's version). Written with h5py (the format those tools read), renamed into place."""
    import h5py

    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        level0 = np.asarray(grid.boxes[:, :2], dtype=np.int64) + np.asarray(origin, dtype=np.int64)
        coords = h5.create_dataset("coords", data=level0)
        coords.attrs["patch_size_level0"] = round(grid.tile_px)
        for name, value in {**attributes, "bounds_offset": list(origin)}.items():
            h5.attrs[name] = value
            coords.attrs[name] = value
    tmp.replace(path)


# -- pictures -------------------------------------------------------------------------------------------


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """The tissue mask (white = tissue) at the thumbnail's size: histoboost slide --tissue-mask takes it back."""
    Image.fromarray((mask * 255).astype(np.uint8)).save(path, optimize=True)


def write_mask_outline_png(path: Path, thumb: np.ndarray, mask: np.ndarray) -> None:
    """The thumbnail with the mask's edge drawn on it, to check the mask by eye."""
    from scipy import ndimage

    edge = mask & ~ndimage.binary_erosion(mask, iterations=1)
    edge = ndimage.binary_dilation(edge, iterations=max(1, round(max(mask.shape) / 600)))
    out = thumb.copy()
    out[edge] = (0, 158, 115)  # Okabe-Ito bluish green
    Image.fromarray(out).save(path, optimize=True)


def footprints(grid: TileGrid, factor: float, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Each tile's cell on a picture with `factor` full-resolution px per pixel: the stride-sized square at the
    tile's centre (the tile itself when tiles do not overlap), clipped to the picture."""
    cells = (_cell(box, grid.stride_px) for box in grid.boxes.tolist())
    return [
        (
            max(0, round(x0 / factor)),
            max(0, round(y0 / factor)),
            min(shape[1], round(x1 / factor)),
            min(shape[0], round(y1 / factor)),
        )
        for x0, y0, x1, y1 in cells
    ]


def write_heatmap_png(
    path: Path,
    thumb: np.ndarray,
    factor: float,
    grid: TileGrid,
    scores: TileScores,
    scheme: ClassScheme,
    mpp: float,
    title: str,
) -> None:
    """Two panels over the slide thumbnail: p(carcinoma) per tile (cividis, colour-blind safe) and the class
    of each tile (Okabe-Ito colours), with a colour bar, a legend and a scale bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if max(thumb.shape[:2]) > HEATMAP_MAX_SIDE:  # the figure shows no more: memory stays flat on large slides
        shrink = HEATMAP_MAX_SIDE / max(thumb.shape[:2])
        size = (max(1, round(thumb.shape[1] * shrink)), max(1, round(thumb.shape[0] * shrink)))
        thumb, factor = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.LANCZOS)), factor / shrink
    h, w = thumb.shape[:2]
    p_map = np.full((h, w), np.nan, dtype=np.float32)
    class_rgba = np.zeros((h, w, 4), dtype=np.uint8)
    p_carcinoma = carcinoma(scheme, scores.probs)
    for (x0, y0, x1, y1), p, k in zip(footprints(grid, factor, (h, w)), p_carcinoma, scores.decision):
        p_map[y0:y1, x0:x1] = p
        class_rgba[y0:y1, x0:x1] = (*class_color(scheme, int(k)), 140)  # 55% opaque
    aspect = w / max(h, 1)
    fig, axes = plt.subplots(1, 2, figsize=(min(16, 2 * 6 * aspect + 2), 6.8), dpi=110, squeeze=True)
    image = axes[0].imshow(thumb)
    image = axes[0].imshow(
        np.ma.masked_invalid(p_map), cmap="cividis", vmin=0, vmax=1, alpha=0.6, interpolation="nearest"
    )
    fig.colorbar(image, ax=axes[0], fraction=0.046, pad=0.02, label="p(carcinoma) = p(in situ) + p(invasive)")
    axes[1].imshow(thumb)
    axes[1].imshow(class_rgba, interpolation="nearest")
    # matplotlib takes any RGB sequence as a colour; its stubs name tuples only.
    axes[1].legend(
        handles=[
            Patch(color=np.asarray(class_color(scheme, k)) / 255, label=c)  # type: ignore[arg-type]
            for k, c in enumerate(scheme.classes)
        ],
        loc="upper right",
        fontsize=8,
        framealpha=0.85,
    )
    for ax, label in zip(axes, ("carcinoma probability per tile", "class per tile")):
        ax.set_title(label, fontsize=10)
        ax.set_axis_off()
        _scale_bar(ax, w, h, factor * mpp)
    fig.suptitle(
        f"{title}\nResearch use only: the image classifier's scores on slide tiles; no slide-level "
        "accuracy has been measured.",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _scale_bar(ax, w: int, h: int, um_per_pixel: float) -> None:
    """A bar of a round length (about a fifth of the picture) in the lower left corner."""
    target = w * um_per_pixel / 5
    length = max((c * 10**e for e in range(6) for c in (1, 2, 5) if c * 10**e <= target), default=1)
    px = length / um_per_pixel
    x, y = 0.04 * w, 0.95 * h
    ax.plot([x, x + px], [y, y], color="black", linewidth=3, solid_capstyle="butt")
    ax.text(
        x + px / 2,
        y - 0.015 * h,
        f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} µm",
        ha="center",
        va="bottom",
        fontsize=8,
        bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0},
    )


# -- QuPath GeoJSON -------------------------------------------------------------------------------------


def carcinoma_regions(grid: TileGrid, scores: TileScores, scheme: ClassScheme, size: tuple[int, int]) -> list:
    """Connected regions of tiles decided carcinoma (in situ or invasive), each a shapely Polygon in image-frame
    pixels (tile cells merged, clipped to the slide), largest first."""
    import shapely

    cells = [
        shapely.box(*_cell(box, grid.stride_px))
        for box, k in zip(grid.boxes.tolist(), scores.decision)
        if scheme.groups[int(k)] > 0
    ]
    if not cells:
        return []
    union = shapely.make_valid(shapely.unary_union(cells).intersection(shapely.box(0, 0, *size)))
    parts = [g for g in getattr(union, "geoms", [union]) if g.geom_type == "Polygon" and g.area > 0]
    return sorted(parts, key=lambda g: (-g.area, g.bounds))


def tissue_mm2(region, tissue, mpp: float) -> float:
    """Tissue area (mm²) inside a region of tile cells: the cells without the glass around the tissue."""
    return region.intersection(tissue).area * mpp**2 / 1e6


def _cell(box: list[int], stride: float) -> tuple[float, float, float, float]:
    """A tile's cell in full-resolution pixels: the stride-sized square at the tile's centre."""
    cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, stride / 2
    return cx - half, cy - half, cx + half, cy + half


def write_geojson(
    path: Path,
    rows: list[dict],
    scheme: ClassScheme,
    size: tuple[int, int],
    tissue,
    regions: list,
    region_classes: list[str],
    region_mm2: list[float],
    ids: str,
    mpp: float,
) -> int:
    """A gzipped FeatureCollection for QuPath (File > Import objects): one "tile" detection per scored tile,
    an annotation outlining the tissue and one per carcinoma region. Ids are UUIDv5 of (`ids`, the object),
    so the same slide and bundle give the same file. Returns the number of features."""
    import shapely

    features = []
    frame = shapely.box(0, 0, *size)
    for row in rows:
        box = shapely.box(row["x"], row["y"], row["x"] + row["width"], row["y"] + row["height"]).intersection(frame)
        k = scheme.classes.index(row["class"])
        measurements = {f"p_{c}": row[f"p_{c}"] for c in scheme.classes}
        measurements.update(
            p_carcinoma=row["p_carcinoma"], tissue_fraction=row["tissue_fraction"], agreement=row["agreement"]
        )
        features.append(
            _feature(
                f"{ids}|tile|{row['x']},{row['y']},{row['width']},{row['height']}",
                box,
                {
                    "objectType": "tile",
                    "isLocked": True,
                    "classification": {"name": row["class"], "color": list(class_color(scheme, k))},
                    "measurements": {m: v for m, v in measurements.items() if math.isfinite(v)},
                },
            )
        )
    if not tissue.is_empty:
        features.append(
            _feature(
                f"{ids}|tissue",
                tissue,
                {
                    "objectType": "annotation",
                    "name": f"tissue ({tissue.area * mpp**2 / 1e6:.2f} mm²)",
                    "classification": {"name": "Tissue", "color": list(TISSUE_COLOR)},
                    "measurements": {"area_mm2": round(tissue.area * mpp**2 / 1e6, 4)},
                },
            )
        )
    for n, (region, name, area) in enumerate(zip(regions, region_classes, region_mm2), start=1):
        features.append(
            _feature(
                f"{ids}|region|{n}",
                region,
                {
                    "objectType": "annotation",
                    "name": f"carcinoma region {n} ({area:.2f} mm² of tissue, mostly {name})",
                    "classification": {"name": f"Carcinoma region {name}", "color": list(REGION_COLOR)},
                    "measurements": {"tissue_area_mm2": round(area, 4)},
                },
            )
        )
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(b'{"type": "FeatureCollection", "features": [\n')
        for n, feature in enumerate(features):
            out.write((",\n" if n else "").encode() + json.dumps(feature, allow_nan=False).encode())
        out.write(b"\n]}\n")
    return len(features)


def _feature(key: str, geometry, properties: dict) -> dict:
    from shapely.geometry import mapping

    return {
        "type": "Feature",
        "id": str(uuid.uuid5(_NAMESPACE, key)),
        "geometry": json.loads(json.dumps(mapping(polygonal(geometry)))),
        "properties": properties,
    }


# -- report ---------------------------------------------------------------------------------------------


def write_tile_pictures(folder: Path, slide, rows: list[dict], top: list[int], side: int = 256) -> list[str]:
    """Small PNGs of the given tiles (by row index), for the report: file names relative to `folder`."""
    folder.mkdir(exist_ok=True)
    names = []
    for rank, index in enumerate(top, start=1):
        row = rows[index]
        box = (row["x"], row["y"], row["x"] + row["width"], row["y"] + row["height"])
        name = f"tile-{rank:02d}.png"
        Image.fromarray(slide.read(box, (side, side))).save(folder / name)
        names.append(f"{folder.name}/{name}")
    return names


def write_report(path: Path, summary: dict, rows: list[dict], top: list[int], pictures: list[str]) -> None:
    """report.html beside the other outputs (relative links only): heat map, mask, summary table and the top
    carcinoma tiles with their probabilities."""
    e = html.escape
    call = summary["call"]
    table = "".join(
        f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>"
        for k, v in [
            ("slide", summary["slide"]["path"]),
            ("call", f"{call['group']} ({call['rule']})"),
            ("refer", "; ".join(summary["refer"]) or "no"),
            ("tissue", f"{summary['tissue']['area_mm2']:.2f} mm²"),
            *((f"area {c}", f"{a:.2f} mm²") for c, a in summary["area_mm2"].items()),
            (
                "carcinoma regions",
                f"{summary['carcinoma_regions']['count']} (largest "
                f"{summary['carcinoma_regions']['largest_mm2']:.2f} mm²)",
            ),
            (
                "tiles",
                f"{summary['tiles']['scored']} scored of {summary['tiles']['in_grid']} in the grid "
                f"({summary['tiles']['confirmed']} confirmed with the full vote)",
            ),
            (
                "tile",
                f"{summary['geometry']['tile_um']:.0f} µm at {summary['geometry']['working_mpp']:.3g} µm/px, "
                f"stride {summary['geometry']['stride_um']:.0f} µm",
            ),
            ("stain", summary["stain"]),
            ("µm/px", f"{summary['slide']['mpp']:.4g} ({summary['slide']['mpp_source']})"),
            ("bundle", summary["bundle"]["sha256"]),
            ("histoboost", summary["histoboost"]),
        ]
    )
    tiles = "".join(
        f"<figure><img src='{e(pic)}' width=192 height=192><figcaption>#{n} x={rows[i]['x']} y={rows[i]['y']}<br>"
        f"{e(rows[i]['class'])}, p(carcinoma) {rows[i]['p_carcinoma']:.3f}"
        f"{' (confirmed)' if rows[i]['confirmed'] else ''}</figcaption></figure>"
        for n, (i, pic) in enumerate(zip(top, pictures), start=1)
    )
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">\
<title>histoboost slide: {e(summary["slide"]["name"])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}} th{{text-align:left;padding-right:1em}}
figure{{display:inline-block;margin:4px;font-size:12px}} img{{max-width:100%}} \
.warn{{background:#fff3cd;padding:.5em}}</style>
</head><body>
<h1>{e(summary["slide"]["name"])}</h1>
<p class="warn"><b>Research use only; not for diagnosis.</b> No slide-level accuracy has been measured (no labelled
slides were available): the tile scores are the image classifier's, trained on microscopy fields, applied to regions
of this slide.</p>
<img src="heatmap.png" alt="heat map">
<h2>Summary</h2><table>{table}</table>
<h2>Tissue mask</h2><img src="mask-outline.png" alt="tissue mask outlined on the thumbnail">
<h2>Tiles most likely carcinoma</h2>{tiles or "<p>none scored</p>"}
<p>Files: tiles.csv, heatmap.npz, {e(summary["files"]["geojson"])} (QuPath: File &gt; Import objects; Measure &gt;
Show measurement maps), summary.json.</p>
</body></html>
"""
    path.write_text(text, encoding="utf-8")
