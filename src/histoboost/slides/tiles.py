"""The tile grid: square tiles of a physical size laid over the tissue, one box per cell.

Boxes are computed from a float grid and each rounded once (x0 = round(start + i * stride)), never by
adding rounded strides, which drifts by up to a pixel per tile across a slide (Slideflow issue #440).
The boxes are the single source of truth for tiles.csv, the GeoJSON, the heat map and the viewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    """Tiles of a slide's image frame: `boxes[i]` = (x0, y0, x1, y1) full-resolution pixels of cell
    (`rows[i]`, `cols[i]`) of a `shape` = (rows, cols) grid; `tissue[i]` its tissue fraction."""

    boxes: np.ndarray  # (N, 4) int64
    rows: np.ndarray  # (N,) int
    cols: np.ndarray  # (N,) int
    tissue: np.ndarray  # (N,) float in [0, 1]
    shape: tuple[int, int]
    start: tuple[float, float]  # image-frame position of cell (0, 0)
    tile_px: float  # tile side in full-resolution pixels
    stride_px: float

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, keep: np.ndarray) -> TileGrid:
        return TileGrid(
            self.boxes[keep],
            self.rows[keep],
            self.cols[keep],
            self.tissue[keep],
            self.shape,
            self.start,
            self.tile_px,
            self.stride_px,
        )


def cell_origin(start: tuple[float, float], tile_px: float, stride_px: float) -> tuple[float, float]:
    """Image-frame position of the corner of cell (0, 0)'s footprint: the stride-sized square centred on tile
    (0, 0) (the tile itself when tiles do not overlap). Cell (r, c) starts `c, r` strides further."""
    return start[0] + (tile_px - stride_px) / 2, start[1] + (tile_px - stride_px) / 2


def tile_grid(
    mask: np.ndarray, factor: float, slide_size: tuple[int, int], tile_px: float, stride_px: float
) -> TileGrid:
    """The grid over the tissue's bounding box in `mask` (thumbnail with `factor` full-resolution px per pixel)
    of a slide of `slide_size` (w, h), with the tissue fraction of every cell (the caller keeps the tissue).

    The grid starts at the bounding box; where its last tile would pass the slide's edge, it moves back so
    the tiles end at the edge (when the slide is wide enough), so no tile reads outside the slide."""
    ys, xs = np.nonzero(mask)
    empty = np.zeros((0, 4), dtype=np.int64)
    if len(xs) == 0:
        return TileGrid(empty, np.zeros(0, int), np.zeros(0, int), np.zeros(0), (0, 0), (0.0, 0.0), tile_px, stride_px)
    starts, counts = [], []
    for low, high, size in ((xs.min(), xs.max() + 1, slide_size[0]), (ys.min(), ys.max() + 1, slide_size[1])):
        low, high = low * factor, min(high * factor, size)
        n = max(1, math.ceil((high - low - tile_px) / stride_px - 1e-9) + 1)
        span = tile_px + (n - 1) * stride_px
        start = max(0.0, min(low, size - span))
        starts.append(start)
        counts.append(n)
    grid_rows, grid_cols = np.meshgrid(np.arange(counts[1]), np.arange(counts[0]), indexing="ij")
    rows, cols = grid_rows.ravel(), grid_cols.ravel()
    x0, y0 = starts[0] + cols * stride_px, starts[1] + rows * stride_px
    boxes = np.stack([np.round(x0), np.round(y0), np.round(x0 + tile_px), np.round(y0 + tile_px)], axis=1)
    boxes = boxes.astype(np.int64)
    return TileGrid(
        boxes,
        rows,
        cols,
        tissue_fractions(mask, factor, boxes),
        (counts[1], counts[0]),
        (starts[0], starts[1]),
        tile_px,
        stride_px,
    )


def tissue_fractions(mask: np.ndarray, factor: float, boxes: np.ndarray) -> np.ndarray:
    """The share of each box's area that the mask marks as tissue (outside the mask counts as no tissue),
    from a summed-area table of the mask: O(1) per box."""
    table = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    edges = np.round(boxes / factor).astype(np.int64)
    x0, x1 = np.clip(edges[:, 0], 0, w), np.clip(edges[:, 2], 0, w)
    y0, y1 = np.clip(edges[:, 1], 0, h), np.clip(edges[:, 3], 0, h)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = np.maximum((edges[:, 2] - edges[:, 0]) * (edges[:, 3] - edges[:, 1]), 1)
    return inside / area
