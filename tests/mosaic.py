"""Test slides made at test time, never committed (BACH's licence forbids modified copies): pyramidal TIFF
mosaics of real BACH images with white glass between them, and a stand-in slide with OpenSlide bounds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

BLOCK_PX = 1536  # the shared BACH copies: 1536 x 1536 px at 0.42 µm/px
BACH_MPP = 0.42
TILE = 256  # TIFF tile side


def write_mosaic(
    path: Path,
    images: list[list[Path | None]],
    mpp: float = BACH_MPP,
    levels: int | None = None,
    gap_blocks: int = 1,
    resolution: bool = True,
) -> list[tuple[int, int, int, int, Path]]:
    """A generic pyramidal TIFF (levels as pages, each half the last, read by OpenSlide as `generic-tiff`) of
    `images` laid on a grid with `gap_blocks` blocks of white glass around and between them; a level's blocks
    are Lanczos reductions of the full image, as `predict` makes them. By default levels go down until the
    longer side is at most 1024 px, as scanners' pyramids do. Written tile row by tile row, so memory
    stays small whatever the mosaic size. Returns each block's box (x0, y0, x1, y1, image path) at level 0."""
    import tifffile

    rows, cols = len(images), len(images[0])
    pitch = BLOCK_PX * (1 + gap_blocks)
    offset = BLOCK_PX * gap_blocks
    size = (offset + cols * pitch, offset + rows * pitch)  # width, height
    if levels is None:
        levels = 1 + max(0, math.ceil(math.log2(max(size) / 1024)))
    blocks = [
        (
            offset + c * pitch,
            offset + r * pitch,
            offset + c * pitch + BLOCK_PX,
            offset + r * pitch + BLOCK_PX,
            images[r][c],
        )
        for r in range(rows)
        for c in range(cols)
        if images[r][c] is not None
    ]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            ds = 2**level
            width, height = size[0] // ds, size[1] // ds
            options = (
                {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}
                if resolution
                else {}
            )
            tif.write(
                _tiles(blocks, width, height, ds),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="zlib",
                compressionargs={"level": 1},
                photometric="rgb",
                subfiletype=1 if level else 0,
                **options,
            )
    return blocks


def _tiles(blocks, width: int, height: int, ds: int):
    cache: dict[Path, np.ndarray] = {}
    side = BLOCK_PX // ds
    for y0 in range(0, height, TILE):
        strip = np.full((TILE, -(-width // TILE) * TILE, 3), 255, dtype=np.uint8)
        wanted = set()
        for bx0, by0, _, _, image in blocks:
            top = by0 // ds
            if top < y0 + TILE and top + side > y0:
                wanted.add(image)
                if image not in cache:
                    with Image.open(image) as full:
                        block = full.convert("RGB")
                        cache[image] = np.asarray(
                            block if ds == 1 else block.resize((side, side), Image.Resampling.LANCZOS)
                        )
                a, b = max(top, y0), min(top + side, y0 + TILE)
                strip[a - y0 : b - y0, bx0 // ds : bx0 // ds + side] = cache[image][a - top : b - top]
        for image in set(cache) - wanted:
            del cache[image]
        for x0 in range(0, width, TILE):
            yield strip[:, x0 : x0 + TILE]


class BoundsSlide:
    """A stand-in for a vendor slide with `openslide.bounds-*` (as MRXS has): another slide shifted by `offset`
    inside a larger level 0, whose properties name the bounds. Reads outside the inner slide are transparent."""

    def __init__(self, inner, offset: tuple[int, int]):
        self.inner, self.offset = inner, offset
        w, h = inner.dimensions
        self.properties = {
            **inner.properties,
            "openslide.bounds-x": str(offset[0]),
            "openslide.bounds-y": str(offset[1]),
            "openslide.bounds-width": str(w),
            "openslide.bounds-height": str(h),
        }
        self.dimensions = (w + offset[0], h + offset[1])
        self.level_count = inner.level_count
        self.level_downsamples = inner.level_downsamples

    def read_region(self, location, level, size):
        return self.inner.read_region((location[0] - self.offset[0], location[1] - self.offset[1]), level, size)

    def close(self):
        self.inner.close()
